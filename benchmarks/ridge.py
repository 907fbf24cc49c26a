"""Automatic ridge against the best fixed lambda_rel (issue 12, part 1).

For each data set (MNIST MLP, Fashion-MNIST MLP, CIFAR-2 CNN; configs in benchmarks/ridge/) it
runs ``tda run`` and ``tda validate`` (80 subsets at alpha 0.5: the ground truth, cached under
--cache), then, for ensembles of M = 1, 2, 3, 5 models, reports LDS on the reporting fold of TRAK
with ``lambda_rel: auto`` against the fixed value of a wide grid (1e-4 .. 1e3) chosen on the
tuning fold, and against the old default 0.01.

    python benchmarks/ridge.py            # ~15 min on 2 cores the first time, seconds after
    python benchmarks/ridge.py --sweep    # LDS against the target effective dimension, k = 256..1024
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.config import load_config  # noqa: E402
from pipelines.ground_truth import GroundTruth, GroundTruthSpec, job_fingerprint  # noqa: E402
from stores import FeatureStore  # noqa: E402
from tda.features import ArrayFeatures, FeatureBlock, concat_blocks  # noqa: E402
from tda.kernel import score_matrix  # noqa: E402
from tda.scorers import TRAKScorer  # noqa: E402
from tda.validation import lds, split_folds  # noqa: E402

GRID = [1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0]


def prepare(config: Path, out: Path) -> tuple[FeatureBlock, FeatureBlock, np.ndarray, np.ndarray]:
    """Run and validate (both resume; cached) and return train/query features and ground truth."""
    for cmd in ("run", "validate"):
        subprocess.run([sys.executable, "-m", "pipelines.cli", cmd, str(config), "--out", str(out), "--quiet"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    cfg = load_config(config)
    v = cfg.validate
    train = concat_blocks(list(FeatureStore.open(out / "features-train").iter_blocks()))
    query = concat_blocks(list(FeatureStore.open(out / "features-query").iter_blocks()))
    spec = GroundTruthSpec(n=len(train.ids), m=len(query.ids), n_subsets=v.subsets,
                           models_per_subset=v.models_per_subset, alpha=v.alpha, seed=v.seed,
                           job=job_fingerprint(cfg))
    gt = GroundTruth(out / "ground-truth", spec)
    return train, query, gt.masks, gt.mean_outputs()


def fold_lds(train: FeatureBlock, query: FeatureBlock, m: int, lam, masks, outputs, queries, subsets) -> float:
    sub = lambda b: FeatureBlock(b.ids, b.feats[:m], b.q[:m])  # noqa: E731
    src = ArrayFeatures(sub(train), range(m))
    scores = score_matrix(sub(query).select(queries), TRAKScorer(lam).fit(src), src)
    return lds(scores, masks[subsets], outputs[np.ix_(subsets, queries)], n_boot=1).mean


SWEEP_DF = [25, 50, 75, 100, 150, 200, 300, 400, 600]


def sweep(name: str, train: FeatureBlock, query: FeatureBlock, masks, outputs, folds: dict) -> None:
    """LDS (tuning / reporting fold) against the target effective dimension, for k = 256, 512, 1024
    (the first k coordinates of the stored projection are a projection of width k) and M = 1, 3, 5."""
    import tda.scorers.trak as trak

    rule = trak.auto_df_fraction
    try:
        for k in (256, 512, 1024):
            for m in (1, 3, 5):
                cut = lambda b: FeatureBlock(b.ids, np.ascontiguousarray(b.feats[:m, :, :k]), b.q[:m])  # noqa: E731
                cells = []
                for df in [d for d in SWEEP_DF if d < 0.95 * k]:
                    trak.auto_df_fraction = lambda models, width, df=df: df / width
                    cells.append(f"{df}: " + " / ".join(f"{fold_lds(cut(train), cut(query), m, 'auto', masks, outputs, *f):.3f}"
                                                        for f in folds))
                print(f"| {name} | {k} | {m} | {rule(m, k) * k:.0f} | " + ", ".join(cells) + " |", flush=True)
    finally:
        trak.auto_df_fraction = rule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "ridge")
    p.add_argument("--sets", default="mnist,fashion,cifar2")
    p.add_argument("--sweep", action="store_true", help="print LDS against the target effective dimension instead")
    a = p.parse_args()
    if a.sweep:
        print("| data set | k | M | df of the rule | df: LDS tuning / reporting fold |\n|---|---|---|---|---|")
    else:
        print("| data set | M | best fixed lambda_rel (tuning fold) | LDS, best fixed | LDS, auto | auto - best | LDS, 0.01 |")
        print("|---|---|---|---|---|---|---|")
    for name in a.sets.split(","):
        train, query, masks, outputs = prepare(ROOT / "benchmarks" / "ridge" / f"{name}.yaml", a.cache / name)
        f = split_folds(len(query.ids), masks.shape[0], 0.5, 0)
        tune = (f["tune_queries"], f["tune_subsets"])
        report = (f["report_queries"], f["report_subsets"])
        if a.sweep:
            sweep(name, train, query, masks, outputs, [tune, report])
            continue
        for m in (1, 2, 3, 5):
            best = max(GRID, key=lambda lam: fold_lds(train, query, m, lam, masks, outputs, *tune))
            fixed, auto, old = (fold_lds(train, query, m, lam, masks, outputs, *report) for lam in (best, "auto", 0.01))
            print(f"| {name} | {m} | {best:g} | {fixed:.3f} | {auto:.3f} | {auto - fixed:+.3f} | {old:.3f} |", flush=True)


if __name__ == "__main__":
    main()
