"""LDS and featurization time of the dense, sparse, factored and tensorsketch projections at
(about) equal width, and of ``auto`` (what it chose recorded), TRAK with the automatic ridge,
per family (issue 14: the default projection; issue 26: the char LM and a Hugging Face classifier).

For each family config of benchmarks/families/ (MNIST MLP, CIFAR-2 CNN, char LM, and the
Hugging Face BERT classifier on AG News, ``hf_bert``, whose model folder, data files and
fine-tuned checkpoints benchmarks/hf_bert_family.py makes offline first) every projection gets
its own `tda run` (same seeds: the same checkpoints) and `tda validate` under the classic
protocol on one shared, cached ground truth (keyed by data, model and train only). The
factored projection's per-layer ``k_in = k_out`` is chosen so its width is the closest to
``featurize.k`` from below; the tensorsketch width is ``featurize.k``, as dense and sparse.
Featurization time is the wall time of `tda run --only featurize` (train and query sets, every
model; including ~3 s of process start-up).

    python benchmarks/projections.py                          # the four families
    python benchmarks/projections.py --only hf_bert           # the Hugging Face classifier
    python benchmarks/projections.py --only mnist_mlp --projections dense sparse
    python benchmarks/projections.py --projections dense sparse tensorsketch
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "families"
FAMILIES = ("mnist_mlp", "cifar2_cnn", "char_lm", "hf_bert")  # the default list
PROJECTIONS = ("dense", "sparse", "factored", "tensorsketch", "auto")


def prepare(fam: str) -> None:
    """Make what a family's config names and no run makes (hf_bert: folder, data, checkpoints)."""
    if fam == "hf_bert":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from hf_bert_family import prepare as prepare_hf_bert

        prepare_hf_bert()


def tda(*args: str, capture: bool = False) -> float | tuple[float, str]:
    """Wall time of a `tda` command (and its output, with ``capture``)."""
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli.main", *args], check=True, cwd=ROOT,
                          capture_output=capture, text=True)
    if capture:
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
        return time.time() - start, done.stdout + done.stderr
    return time.time() - start


def factored_side(cfg: Path, k: int) -> tuple[int, int]:
    """The largest k_in = k_out whose factored width is at most k, and that width."""
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.families import family_for
    from pipelines.families.base import projection_width

    best = (1, 0)
    for side in range(1, 129):
        c = load_config(cfg, ["featurize.projection=factored", f"featurize.k_in={side}", f"featurize.k_out={side}"])
        width = projection_width(c, family_for(c).build_model(c))
        if width > k:
            break
        best = (side, width)
    return best


def measure(cfg: Path, cache: Path, projection: str, k: int) -> dict:
    done = cache / f"{projection}.json"
    if done.is_file():
        return json.loads(done.read_text())
    sets = ["--set", "score.scorer=trak", "--set", f"featurize.projection={projection}"]
    width = k
    if projection == "factored":
        side, width = factored_side(cfg, k)
        sets += ["--set", f"featurize.k_in={side}", "--set", f"featurize.k_out={side}"]
    run = cache / projection
    tda("run", str(cfg), "--out", str(run), "--quiet", "--only", "train", *sets)
    featurize_s, said = tda("run", str(cfg), "--out", str(run), "--quiet", "--only", "featurize", *sets, capture=True)
    tda("run", str(cfg), "--out", str(run), "--quiet", *sets)
    wall = tda("validate", str(cfg), "--out", str(run), "--quiet", *sets, "--set", "validate.protocol=classic",
               "--set", "validate.scorers=[trak]", "--set", f"validate.ground_truth_dir={cache / 'gt'}")
    res = json.loads((run / "validation" / "validation.json").read_text())
    rep = res["scorers"]["trak"]["report"]
    out = {"projection": projection, "width": width, "lds": rep["mean"], "ci": [rep["ci_low"], rep["ci_high"]],
           "featurize_s": featurize_s, "validate_s": wall, "subsets": res["subsets"],
           "lambda": res["scorers"]["trak"].get("lambda", {})}
    if projection == "auto":  # what it chose: the stored training features' projection, and the run's reason
        from pipelines.families.base import recorded_projection
        from pipelines.layout import RunPaths

        reason = re.search(r"projection \w+ \(auto: (.*?)\)(?: \([\d.]+s\))?$", said, re.M)
        out["chose"] = recorded_projection(RunPaths(run))
        out["reason"] = reason.group(1) if reason else ""
    done.write_text(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "projections")
    ap.add_argument("--only", nargs="*", choices=FAMILIES)
    ap.add_argument("--projections", nargs="*", default=list(PROJECTIONS), choices=PROJECTIONS)
    args = ap.parse_args()
    rows, start = [], time.time()
    for fam in args.only or FAMILIES:
        cfg = CONFIGS / f"{fam}.yaml"
        prepare(fam)
        sys.path.insert(0, str(ROOT))
        from pipelines.config import load_config

        k = load_config(cfg).featurize.k
        for proj in args.projections:
            r = measure(cfg, args.cache / fam, proj, k)
            rows.append((fam, r))
            chose = f" chose {r['chose']} ({r['reason']})" if "chose" in r else ""
            print(f"{fam:>11} {proj:>12} width {r['width']:>5}  LDS {r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
                  f"  featurize {r['featurize_s']:.1f} s{chose}", flush=True)
    print("\n| family | projection | width | LDS (classic, TRAK auto ridge) | LDS - dense | featurize s |")
    print("|---|---|---|---|---|---|")
    dense = {fam: r["lds"] for fam, r in rows if r["projection"] == "dense"}
    for fam, r in rows:
        diff = f"{r['lds'] - dense[fam]:+.3f}" if fam in dense else ""
        fs = f"{r['featurize_s']:.1f}"
        name = f"{r['projection']} ({r['chose']})" if "chose" in r else r["projection"]
        print(f"| {fam} | {name} | {r['width']} | {r['lds']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] "
              f"| {diff} | {fs} |")
    print(f"\nwall time {time.time() - start:.0f} s (cached measurements reused)")


if __name__ == "__main__":
    main()
