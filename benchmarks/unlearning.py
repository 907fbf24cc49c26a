"""Unlearning benchmark (issue 13): forget the training data that drives a class's test margins.

For each config in benchmarks/unlearning/ it runs ``tda run``, ``tda validate`` (the calibration
line) and ``tda unlearn`` (all resume; outputs under --cache), and prints the predicted change of
the group's summed margin (raw and calibrated) against the actual change after retraining without
the forget set, and the same for a random control of the same size, with query accuracies; then
the approximate unlearning variants (gradient difference, masked) against the retrained models.

    python benchmarks/unlearning.py          # ~10 min on 2 cores the first time, seconds after
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cell(x: dict) -> str:
    return f"{x['mean']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "unlearning")
    p.add_argument("--sets", default="mnist,char_lm")
    a = p.parse_args()
    print("| data set | behaviour | set | k | predicted raw | predicted calibrated | actual (95% CI over seeds) | "
          "group accuracy | other-query accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.sets.split(","):
        config, out = ROOT / "benchmarks" / "unlearning" / f"{name}.yaml", a.cache / name
        for cmd in ("run", "validate", "unlearn"):
            subprocess.run([sys.executable, "-m", "pipelines.cli.main", cmd, str(config), "--out", str(out), "--quiet"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        res = json.loads((out / "unlearning" / "unlearning.json").read_text())
        ch = res["check"]
        accuracy = lambda arm, key: (f"{ch[arm]['accuracy'][key]['mean']:.3f}"  # noqa: E731
                                     if "accuracy" in ch.get(arm, {}) and ch[arm]["accuracy"].get(key) else "-")
        if "accuracy" in ch.get("full", {}):
            print(f"| {name} | {res['behaviour']} | none (full data) | 0 | | | | {accuracy('full', 'group')} | "
                  f"{accuracy('full', 'other_queries')} |")
        for arm, pred in (("forget", res["predicted"]), ("control", res["control_predicted"])):
            cal = pred.get("calibrated", {}).get("group")
            print(f"| {name} | {res['behaviour']} | {arm} | {res['k']} | {pred['group']:+.3f} | "
                  f"{'' if cal is None else f'{cal:+.3f}'} | {cell(ch[arm]['actual_group'])} | {accuracy(arm, 'group')} | "
                  f"{accuracy(arm, 'other_queries')} |")
        rho = ch["spearman_predicted_actual"]
        print(f"\nper query (forget set): Spearman of predicted against actual change {rho if rho is None else f'{rho:.3f}'}")
        ap = res.get("approximate")
        if ap is None:
            continue
        print(f"\nwithout retraining ({ap['steps']} steps, lr {ap['lr']:g}, mask {ap['mask_fraction']:.0%} of weights; "
              f"retrained: forget-set arm above)\n")
        print("| variant | forget acc | forget loss | retain acc | retain loss | query acc | membership AUC | "
              "output distance to retrained |")
        print("|---|---|---|---|---|---|---|---|")
        get = lambda m, key: f"{m[key]:.3f}" if key in m else "-"  # noqa: E731 (an LM has no accuracies)
        for name, m in ap["variants"].items():
            print(f"| {name} | {get(m, 'forget_accuracy')} | {m['forget_loss']:.3f} | {get(m, 'retain_accuracy')} | "
                  f"{m['retain_loss']:.3f} | {get(m, 'query_accuracy')} | {m['membership_auc']:.3f} | "
                  f"{m['output_distance_to_retrained']:.2f} |")


if __name__ == "__main__":
    main()
