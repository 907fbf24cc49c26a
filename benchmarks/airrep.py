"""AirRep vs RepSim vs TRAK-1 on MNIST, on the LDS benchmark's ground truth (docs/methods.md 5, 6).

Setting of benchmarks/lds.py: MLP 784-128-10, 5,000 training / 500 test images, 10 epochs SGD,
its cached ground truth (100 subsets at alpha 0.5, one retraining each) and its cached model
``full-00`` (the TRAK-1 model). Every method attributes that one model:

- RepSim: cosine of the hidden layer (module "1", the ReLU) of the model;
- AirRep: an encoder head on the same hidden representations, trained on its *own* subset
  retrainings (``--subsets`` subsets at alpha 0.5 of the same 5,000 training images, seeds apart
  from the ground truth's) measured on ``--queries`` *training queries*: MNIST training images
  5000.. (never trained on, disjoint from the 500 test queries: checked);
- AirRep, label-aware input: the same head machinery (a linear head) on ``(e_y - p) (x) h``, the
  hidden layer times the label's error ``onehot(y) - softmax(logits)`` (the last layer's
  per-example gradient: Representer-point-style features), to show what the learned head gains
  when its input carries the label;
- TRAK-1: the default TRAK on the cached k=512 features of the same model.

LDS is reported on the ground truth's report fold (half the test queries x half the subsets,
:func:`tda.validation.split_folds` with seed 0, as in lds.py) and on all of it. AirRep's
retrainings are stored under ``--cache`` and resumed; the ground-truth cache is only read.

    PYTHONPATH=. python benchmarks/airrep.py                       # first run ~10 min on 2 cores
    PYTHONPATH=. python benchmarks/airrep.py --subsets 40 --queries 500   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds import evaluate, featurize, first, gt_folder, recipe, train_models  # noqa: E402  (sibling benchmark script)

from pipelines.methods.airrep import airrep_ground_truth  # noqa: E402
from pipelines.config import parse_config  # noqa: E402
from pipelines.executors import make_executor  # noqa: E402
from pipelines.families import family_for  # noqa: E402
from pipelines.ground_truth import GroundTruth, GroundTruthSpec  # noqa: E402
from pipelines.run import as_numpy_batch, build_model, datasets_for  # noqa: E402
from pipelines.spec.options import score_options  # noqa: E402
from pipelines.stages.validate import job_fingerprint  # noqa: E402
from tda.scorers.airrep.head import AirRepData  # noqa: E402
from tda.core.features import ArrayFeatures, FeatureBlock  # noqa: E402
from tda.core.kernel import score_matrix  # noqa: E402
from tda.featurizers.representations import RepresentationFeaturizer  # noqa: E402
from tda.scorers import AirRepScorer, RepSimScorer, TRAKScorer  # noqa: E402
from tda.validation import split_folds  # noqa: E402


def airrep_config(args: argparse.Namespace):
    """lds.py's recipe with ``score.scorer: airrep`` and this run's AirRep budget."""
    base = recipe(args).to_dict()
    base["score"] = {"scorer": "airrep", "options": {
        "queries": args.queries, "subsets": args.subsets, "subset_epochs": args.subset_epochs, "data_dir": args.cache,
        "width": args.width, "hidden": args.hidden, "steps": args.steps, "pooling": args.pooling}}
    return parse_config({k: base[k] for k in ("data", "model", "train", "featurize", "score")})


def representations(cfg, state: dict, dataset, label_aware: bool = False) -> FeatureBlock:
    """Hidden-layer representations (1, n, 128) of a dataset under one model, or with
    ``label_aware`` the label-aware ``(onehot(y) - softmax(logits)) (x) h`` (1, n, 10 * 128)."""
    b = as_numpy_batch(dataset)
    feat = RepresentationFeaturizer(build_model(cfg), "1", label_key="y" if label_aware else None)
    ((ids, h, q),) = feat.featurize(state, 0, [(np.arange(len(b["y"])), b)])
    return FeatureBlock(np.asarray(dataset["id"]), h[None], q[None])


def fit_airrep(train: FeatureBlock, queries: FeatureBlock, sup, keys: dict, head) -> tuple[AirRepScorer, float]:
    t = time.time()
    data = AirRepData(train.ids, queries.feats, queries.ids, sup.masks, sup.mean_outputs(), provenance=keys)
    return AirRepScorer(data, head=head).fit(ArrayFeatures(train, [0])), time.time() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    p.add_argument("--gt", default=str(Path.home() / ".cache" / "tda" / "lds-mnist-mlp" / "e10"),
                   help="benchmarks/lds.py's cache (read only)")
    p.add_argument("--gt-models", type=int, default=1,
                   help="models per subset of that ground truth (the figures in docs/benchmarks/lds.md: 1; lds.py's default: 4)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "tda" / "airrep-mnist"))
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the attributed model (lds.py's cache: 10)")
    p.add_argument("--subset-epochs", type=int, default=10, help="epochs of AirRep's subset models")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--hidden", type=int, default=0, help="head MLP width (0: linear, the default head)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pooling", default="sum")
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    cfg = airrep_config(args)
    gt_cache = Path(args.gt)

    # ground truth of the test queries (benchmarks/lds.py), only read
    r = args.gt_models
    gt_dir = gt_folder(gt_cache, 100, r)
    gt = GroundTruth(gt_dir, GroundTruthSpec(n=5000, m=500, n_subsets=100, models_per_subset=r, alpha=0.5, seed=0,
                                             job=job_fingerprint(cfg)))
    if gt.pending():
        raise SystemExit(f"{gt_dir} is incomplete; run `python benchmarks/lds.py --gt-models {r}` first")
    masks, outputs = gt.masks, gt.outputs()  # (J, R, m), as lds.evaluate takes them
    folds = split_folds(500, 100, 0.5, seed=0)

    # AirRep supervision: own subsets, training queries = MNIST train images 5000..
    family, data = family_for(cfg), datasets_for(cfg)
    queries = family.airrep_queries(cfg)
    keys = {"train": family.provenance(cfg, "train"), "queries": family.provenance(cfg, "airrep"),
            "evaluation": family.provenance(cfg, "query")}
    sup = airrep_ground_truth(cfg, None, len(data["train"]), len(queries), keys["queries"])
    overlap = int((sup.masks[:, None, :] == masks[None, :, :]).all(axis=2).sum())
    t1 = time.time()
    if sup.pending():
        with make_executor("dask", workers=args.workers) as ex:
            sup.compute(family.subset_job(cfg, "airrep", args.subset_epochs), ex)
    t_sup = time.time() - t1

    state = train_models(cfg, gt_cache, 1, half=False)[0]  # cached full-00.pt
    torch.set_num_threads(1)  # the head's small matmuls: one thread is faster on a shared machine
    head, rows, fitted = score_options(cfg, family_for(cfg)).head_config(), {}, {}
    for label_aware, label in ((False, "hidden layer"), (True, "label-aware (e_y - p) x h")):
        feats = {split: representations(cfg, state, d, label_aware) for split, d in
                 (("train", data["train"]), ("test", data["query"]), ("airrep", queries))}
        src = ArrayFeatures(feats["train"], [0])
        rows[f"RepSim ({label}, cosine)"] = score_matrix(feats["test"], RepSimScorer().fit(src), src)
        fitted[label] = fit_airrep(feats["train"], feats["airrep"], sup, keys, head)
        rows[f"AirRep ({label})"] = score_matrix(feats["test"], fitted[label][0], src)
    tf, tq = featurize(cfg, [state], args.k, "full", gt_cache)  # cached k=512 features of full-00
    src = ArrayFeatures(first(tf, 1), [0])
    rows["TRAK-1 (default lambda)"] = score_matrix(first(tq, 1), TRAKScorer().fit(src), src)

    res = {name: evaluate(s, masks, outputs, folds, tuned=False) for name, s in rows.items()}
    print(f"\nMNIST MLP 784-128-10, 5000 train / 500 test queries; ground truth {gt_dir} (100 subsets x {r})")
    print(f"AirRep supervision: {args.subsets} subsets x {args.queries} training queries (train images "
          f"{int(queries['id'][0])}..{int(queries['id'][-1])}), {args.subset_epochs} epochs each, {t_sup:.0f}s here "
          f"(stored in {sup.store.root}); subsets equal to ground-truth subsets: {overlap}")
    for label, (scorer, secs) in fitted.items():
        fit = scorer.fitted
        print(f"AirRep head on {label}: {args.hidden or 'linear'} -> {args.width}, {args.pooling} pooling; step "
              f"{fit.best_step} of {args.steps} kept (held-out Spearman {max(fit.val_spearman):.3f}), loss "
              f"{fit.loss[0]:.3f} -> {fit.loss[-1]:.3f}, {secs:.1f}s")
    print(f"{'method':<40} {'LDS all queries/subsets':>26} {'LDS report fold':>26}")
    for name, r in res.items():
        cells = [f"{r[k]['mean']:.3f} [{r[k]['ci_low']:.3f}, {r[k]['ci_high']:.3f}]" for k in ("all", "report")]
        print(f"{name:<40} {cells[0]:>26} {cells[1]:>26}")
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
