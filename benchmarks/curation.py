"""Curation benchmark (issue 13): find flipped labels on MNIST MLP and CIFAR-2 CNN, shuffled sequences on the char LM, at 10 % noise.

For each data set (configs in benchmarks/curation/) it runs ``tda run`` and ``tda curate`` (both
resume; outputs under --cache) and prints one table: per method (self-influence under TRAK,
TracInCP and Grad-Dot, of the training loss (the default) and of the output f; the training-loss and 1 - p(label) baselines; the trak+loss rank ensemble)
the ROC-AUC, average precision and the share of flipped labels found in the top 5 / 10 / 20 %,
then the retraining check of the default method (query accuracy without the top 10 % flagged
against without a random 10 %, 3 paired seeds; for the LM the queries' completion log-probability).

    python benchmarks/curation.py                        # ~10 min on 2 cores the first time, seconds after
    python benchmarks/curation.py --sets mnist,cifar2,char_lm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: rankings that are (or contain) a self-influence, computed of the loss and of the output
SELF = ("trak", "tracin", "graddot", "trak+loss", "trak+loss+confidence")


def tda(cmd: str, config: Path, out: Path, *sets: str) -> None:
    subprocess.run([sys.executable, "-m", "pipelines.cli.main", cmd, str(config), "--out", str(out), "--quiet", *sets],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "curation")
    p.add_argument("--sets", default="mnist,cifar2")
    a = p.parse_args()
    print("| data set | method | self-influence of | ROC-AUC | AP | found in top 5% | 10% | 20% |")
    print("|---|---|---|---|---|---|---|---|")
    checks = []
    for name in a.sets.split(","):
        config, out = ROOT / "benchmarks" / "curation" / f"{name}.yaml", a.cache / name
        tda("run", config, out)
        tda("curate", config, out, "--set", "curate.self_influence=output", "--set", "curate.retrain_seeds=0")
        output = json.loads((out / "curation" / "curation.json").read_text())
        tda("curate", config, out)  # the default: of the loss, with the retraining check
        res = json.loads((out / "curation" / "curation.json").read_text())
        for method, m in res["methods"].items():
            rows = [("loss", m)] if method not in SELF else [("loss", m), ("output", output["methods"][method])]
            for target, r in rows:
                f, lead = r["found_at"], " (default)" if method == res["method"] and target == "loss" else ""
                of = target if method in SELF else ""
                print(f"| {name} | {method}{lead} | {of} | {r['auc']:.3f} | {r['ap']:.3f} | {f['5%']:.2f} | "
                      f"{f['10%']:.2f} | {f['20%']:.2f} |", flush=True)
        checks.append((name, res))
    print("\n| data set | removed | query metric | without flagged | without random | flagged - random |")
    print("|---|---|---|---|---|---|")
    for name, res in checks:
        c = res["check"]
        cell = lambda x: f"{x['mean']:.4f} [{x['ci_low']:.4f}, {x['ci_high']:.4f}]"  # noqa: E731
        metric = c.get("metric", "accuracy")
        print(f"| {name} | {c['removed']} ({c['remove_fraction']:.0%}) | {metric} | {cell(c[metric]['flagged'])} | "
              f"{cell(c[metric]['random'])} | {cell(c['flagged_minus_random'])} |")


if __name__ == "__main__":
    main()
