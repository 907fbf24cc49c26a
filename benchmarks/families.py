"""LDS of every scorer, per family, under both protocols of ``tda validate`` (issue 12, part 4).

For each config in benchmarks/families/ (MNIST MLP, CIFAR-2 CNN, char LM, DDPM) it runs
``tda run`` once and ``tda validate`` under the classic protocol (random halves, fresh seeds)
and the fixed-seed small-drop protocol (each subset drops 1%; the run's seed and, where the
family's recipe takes data weights, its batch order). Every scorer that reads the run's features
is measured on the same ground truth. The tables give LDS on the reporting fold with its 95%
bootstrap interval, and the calibration slope of actual against predicted group effects (fitted
on the tuning fold). Runs and ground truth are cached under --cache and reused.

    python benchmarks/families.py                       # all four, both protocols
    python benchmarks/families.py --only mnist_mlp --protocols small-drop
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "families"
PROTOCOLS = ("classic", "small-drop")


def tda(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipelines.cli.main", *args], check=True, cwd=ROOT)


def validate(cfg: Path, cache: Path, protocol: str) -> dict:
    """The validation result of one protocol (cached as JSON with its wall time)."""
    done = cache / f"validation-{protocol}.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.time()
    tda("validate", str(cfg), "--out", str(cache / "run"), "--quiet", "--set", f"validate.protocol={protocol}",
        "--set", f"validate.ground_truth_dir={cache / ('gt-' + protocol)}")
    res = json.loads((cache / "run" / "validation" / "validation.json").read_text())
    res["wall_s"] = time.time() - start
    done.write_text(json.dumps(res))
    return res


def table(name: str, results: dict[str, dict]) -> str:
    """Markdown: one row per scorer, a column pair (LDS, slope) per protocol."""
    scorers = sorted({s for r in results.values() for s in r["scorers"]})
    head = " | ".join(f"{p} LDS | {p} slope" for p in results)
    lines = [f"**{name}**  " + "; ".join(
        f"{p}: {r['subsets']} subsets x {r['models_per_subset']}, alpha {r['alpha']:g}, {r['n_queries']} queries, "
        f"{r['n_train']} train, batch order {r['ground_truth']['batch_order']}, {r['wall_s']:.0f} s"
        + (f", LDS ceiling {r['ground_truth']['noise']['lds_ceiling']:.2f}" if "noise" in r["ground_truth"] else "")
        for p, r in results.items()), "", f"| scorer | {head} |", "|---" * (1 + 2 * len(results)) + "|"]
    for s in scorers:
        cells = []
        for r in results.values():
            if s not in r["scorers"]:
                cells += ["", ""]
                continue
            rep, fit = r["scorers"][s]["report"], r["scorers"][s]["calibration"]["fit"]
            cells += [f"{rep['mean']:.3f} [{rep['ci_low']:.2f}, {rep['ci_high']:.2f}]", f"{fit['slope']:.3g}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "families")
    ap.add_argument("--only", nargs="*", help="config names (default: all in benchmarks/families/)")
    ap.add_argument("--protocols", nargs="*", default=list(PROTOCOLS), choices=PROTOCOLS)
    args = ap.parse_args()
    configs = sorted(CONFIGS.glob("*.yaml"))
    for cfg in configs:
        if args.only and cfg.stem not in args.only:
            continue
        cache = args.cache / cfg.stem
        start = time.time()
        tda("run", str(cfg), "--out", str(cache / "run"), "--quiet")
        print(f"{cfg.stem}: run in {time.time() - start:.0f} s", flush=True)
        results = {p: validate(cfg, cache, p) for p in args.protocols}
        print(table(cfg.stem, results) + "\n", flush=True)


if __name__ == "__main__":
    main()
