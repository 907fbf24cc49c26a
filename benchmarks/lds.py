"""LDS benchmark on MNIST (docs/methods.md section 6; dattri's MNIST-MLP size).

MLP 784-128-10, 5,000 training / 500 test examples, ground truth of J subsets at alpha 0.5
x R retrainings each (--gt-models, default 4; the measured output is their mean, and with
R >= 2 the ground truth's noise ceiling and the LDS against one model per subset are printed
too). On identical models and ground truth it reports LDS for

- tda TRAK with M = 1, 5, 10 models trained on the full data and on random halves, at the
  default lambda and at lambda chosen on the tuning fold,
- traker TRAK with the same M and k at its defaults (full-data models),
- TracInCP (4 checkpoints of one run, their learning rates), Grad-Cos, RepSim.

Every figure is given on the reporting fold (half the queries x half the subsets, never used
for tuning); untuned methods are also given on all queries x all subsets. Ground truth, models
and features are cached under --cache (outside the repo) and reused on later runs.

    python benchmarks/lds.py                    # full benchmark (first run ~14 min on 2 cores)
    python benchmarks/lds.py --subsets 20 --models 3 --gt-models 2 --no-traker   # quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.config import parse_config
from pipelines.executors import make_executor
from pipelines.families.training import train_classifier
from pipelines.ground_truth import GroundTruth, GroundTruthSpec
from pipelines.run import as_numpy_batch, build_model, datasets_for
from pipelines.stages.validate import MNISTRetrainJob, job_fingerprint
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.featurizers.gradient import Featurizer
from tda.core.kernel import score_matrix
from tda.scorers import TRAKScorer
from tda.models.tasks import ClassificationTask
from tda.validation import ground_truth_reliability, lds, score_noise, split_folds

LAMBDA_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0]


def recipe(args: argparse.Namespace):
    return parse_config({
        "data": {"root": args.data, "train_size": 5000, "query_size": 500, "subset": "first"},  # the cached ground truth's rows
        "model": {"hidden": [128]},
        "train": {"epochs": args.epochs, "lr": 0.05, "batch_size": 64},
        "featurize": {"k": args.k},
    })


def gt_folder(cache: Path, subsets: int, models_per_subset: int) -> Path:
    """The cached ground truth of ``subsets`` x ``models_per_subset`` (``gt-100``, ``gt-100x4``)."""
    return cache / (f"gt-{subsets}" + (f"x{models_per_subset}" if models_per_subset > 1 else ""))


def train_models(cfg, cache: Path, count: int, half: bool, save_epochs: bool = False) -> list[dict]:
    """Models on the full data (seeds 0..) or on random halves; cached state dicts."""
    train = as_numpy_batch(datasets_for(cfg)["train"])
    n = len(train["y"])
    states = []
    for i in range(count):
        path = cache / "models" / f"{'half' if half else 'full'}-{i:02d}.pt"
        if not path.is_file() or (save_epochs and not (cache / "models" / "full-00-epochs.pt").is_file()):
            rows = np.random.default_rng([99, i]).permutation(n)[: n // 2] if half else np.arange(n)
            epochs: list[dict] = []
            model = train_classifier(lambda: build_model(cfg), train["x"][rows], train["y"][rows],
                                     epochs=cfg.train.epochs, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                                     seed=1000 * half + i,
                                     on_epoch=lambda e, m: epochs.append({k: v.clone() for k, v in m.state_dict().items()}))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            if save_epochs and i == 0:
                torch.save(epochs, cache / "models" / "full-00-epochs.pt")
        states.append(torch.load(path, weights_only=True))
    return states


def featurize(cfg, states: list[dict], k: int, tag: str, cache: Path) -> tuple[FeatureBlock, FeatureBlock]:
    """Train and query features (M, n, k) for the given checkpoints; cached as npz."""
    path = cache / "features" / f"{tag}-k{k}.npz"
    if path.is_file():
        with np.load(path) as z:
            return (FeatureBlock(z["tid"], z["tf"], z["tq"]), FeatureBlock(z["qid"], z["qf"], z["qq"]))
    data = datasets_for(cfg)
    fz = Featurizer(build_model(cfg), ClassificationTask(), k=k, seed=0)
    out = {}
    for split in ("train", "query"):
        b = as_numpy_batch(data[split])
        feats, qs = [], []
        for c, st in enumerate(states):
            parts = list(fz.featurize(st, c, ((np.arange(lo, min(lo + 500, len(b["y"]))),
                                                 {"x": b["x"][lo: lo + 500], "y": b["y"][lo: lo + 500]})
                                                for lo in range(0, len(b["y"]), 500))))
            feats.append(np.concatenate([p[1] for p in parts]))
            qs.append(np.concatenate([p[2] for p in parts]))
        out[split] = FeatureBlock(np.arange(len(b["y"])), np.stack(feats), np.stack(qs))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, tid=out["train"].ids, tf=out["train"].feats, tq=out["train"].q,
             qid=out["query"].ids, qf=out["query"].feats, qq=out["query"].q)
    return out["train"], out["query"]


def first(block: FeatureBlock, m: int) -> FeatureBlock:
    return FeatureBlock(block.ids, block.feats[:m], block.q[:m])


def evaluate(scores: np.ndarray, masks: np.ndarray, runs: np.ndarray, folds: dict, tuned: bool) -> dict:
    """LDS against the mean of the R models per subset; ``runs`` is (J, R, m). With R >= 2 also
    ``report_1``: the report fold against the first model of each subset alone (an R = 1 ground truth)."""
    rq, rj = folds["report_queries"], folds["report_subsets"]
    outputs = runs.mean(axis=1)
    rep = lds(scores[rq], masks[rj], outputs[np.ix_(rj, rq)])
    res = {"report": rep.as_dict()}
    if runs.shape[1] > 1:
        res["report_1"] = lds(scores[rq], masks[rj], runs[:, 0][np.ix_(rj, rq)]).as_dict()
    if not tuned:
        res["all"] = lds(scores, masks, outputs).as_dict()
    return res


def trak_tuned(train: FeatureBlock, query: FeatureBlock, masks, outputs, folds) -> tuple[np.ndarray, float]:
    tq, tj = folds["tune_queries"], folds["tune_subsets"]
    src = ArrayFeatures(train, range(train.feats.shape[0]))
    best, best_lds = LAMBDA_GRID[0], -np.inf
    for lam in LAMBDA_GRID:
        sc = TRAKScorer(lam).fit(src)
        val = lds(score_matrix(query.select(tq), sc, src), masks[tj], outputs[np.ix_(tj, tq)]).mean
        if val > best_lds:
            best, best_lds = lam, val
    sc = TRAKScorer(best).fit(src)
    return score_matrix(query, sc, src), best


def traker_scores(cfg, states: list[dict], ms: list[int], k: int, cache: Path) -> dict[int, np.ndarray]:
    """traker TRAK (CPU, defaults: lambda 0) for the first m models, m in ms: (n_query, n_train)."""
    import shutil
    import tempfile

    from trak import TRAKer

    data = datasets_for(cfg)
    tr, qu = as_numpy_batch(data["train"]), as_numpy_batch(data["query"])
    tmp = Path(tempfile.mkdtemp(prefix="traker-", dir=cache))
    model = build_model(cfg).eval()
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(tr["y"]), save_dir=str(tmp),
                    device="cpu", proj_dim=k, use_half_precision=False, logging_level=40)
    for i, st in enumerate(states):
        traker.load_checkpoint(st, model_id=i)
        for lo in range(0, len(tr["y"]), 500):
            traker.featurize(batch=(tr["x"][lo: lo + 500], tr["y"][lo: lo + 500]), num_samples=len(tr["y"][lo: lo + 500]))
    traker.finalize_features()
    for i, st in enumerate(states):
        traker.start_scoring_checkpoint(exp_name="q", checkpoint=st, model_id=i, num_targets=len(qu["y"]))
        traker.score(batch=(qu["x"], qu["y"]), num_samples=len(qu["y"]))
    out = {m: np.array(traker.finalize_scores(exp_name="q", model_ids=list(range(m)))).T.astype(np.float64) for m in ms}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "tda" / "lds-mnist-mlp"))
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--gt-models", type=int, default=4,
                   help="models per subset in the ground truth (>= 2 also reports its noise ceiling)")
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="dask LocalCluster workers for the ground truth")
    p.add_argument("--no-traker", action="store_true")
    p.add_argument("--json", help="write the table as JSON here")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = recipe(args)
    cache = Path(args.cache) / f"e{args.epochs}"
    t0 = time.time()
    spec = GroundTruthSpec(n=5000, m=500, n_subsets=args.subsets,
                           models_per_subset=args.gt_models, alpha=0.5, seed=0, job=job_fingerprint(cfg))
    gt = GroundTruth(gt_folder(cache, args.subsets, args.gt_models), spec)
    if gt.pending():
        with make_executor("dask", workers=args.workers) as ex:
            gt.compute(MNISTRetrainJob(cfg, 500), ex)
    t_gt = time.time() - t0
    masks, outputs = gt.masks, gt.outputs()
    folds = split_folds(500, args.subsets, 0.5, seed=0)
    ms = sorted({1, min(5, args.models), args.models})
    rows: dict[str, dict] = {}
    for kind in ("full", "half"):
        states = train_models(cfg, cache, args.models, half=kind == "half", save_epochs=kind == "full")
        train, query = featurize(cfg, states, args.k, kind, cache)
        for m in ms:
            src = ArrayFeatures(first(train, m), range(m))
            s = score_matrix(first(query, m), TRAKScorer().fit(src), src)
            rows[f"tda TRAK-{m} {kind} default"] = evaluate(s, masks, outputs, folds, tuned=False)
            s, lam = trak_tuned(first(train, m), first(query, m), masks, outputs.mean(axis=1), folds)
            rows[f"tda TRAK-{m} {kind} tuned (lambda {lam:g})"] = evaluate(s, masks, outputs, folds, tuned=True)
        if kind == "full" and args.models >= 2:
            stack = []
            for m in range(args.models):
                one = ArrayFeatures(FeatureBlock(train.ids, train.feats[m: m + 1], train.q[m: m + 1]), [m])
                stack.append(score_matrix(FeatureBlock(query.ids, query.feats[m: m + 1], query.q[m: m + 1]),
                                          TRAKScorer().fit(one), one))
            noise = score_noise(np.stack(stack)).as_dict()
        if kind == "full" and not args.no_traker:
            for m, s in traker_scores(cfg, states, ms, args.k, cache).items():
                rows[f"traker TRAK-{m} {kind} default"] = evaluate(s, masks, outputs, folds, tuned=False)
    rows.update(other_methods(cfg, cache, args.k, masks, outputs, folds))
    print(f"\nMNIST MLP 784-128-10, 5000 train / 500 queries, {args.subsets} subsets x {args.gt_models} model(s) "
          "at alpha 0.5, "
          f"k={args.k}, {args.epochs} epochs; ground truth {t_gt:.0f}s (cached in {cache})")
    keys = ("all", "report", "report_1") if args.gt_models > 1 else ("all", "report")
    print(f"{'method':<44} {'LDS all queries/subsets':>26} {'LDS report fold':>26}"
          + (f" {'report fold, 1 model/subset':>28}" if args.gt_models > 1 else ""))
    for name, r in rows.items():
        cells = []
        for key in keys:
            x = r.get(key)
            cells.append(f"{x['mean']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]" if x else "- (tuned)")
        print(f"{name:<44} " + " ".join(f"{c:>26}" for c in cells))
    for m in ms:
        a = rows.get(f"tda TRAK-{m} full default", {}).get("report", {}).get("mean")
        b = rows.get(f"traker TRAK-{m} full default", {}).get("report", {}).get("mean")
        if a is not None and b is not None:
            print(f"TRAK-{m} full, report fold: tda default {a:.3f} vs traker {b:.3f} (difference {a - b:+.3f})")
    if args.models >= 2:
        print(f"score noise over {args.models} independently trained models (TRAK-1 each): "
              + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in noise.items()))
    if args.gt_models >= 2:
        rel = ground_truth_reliability(outputs).as_dict()  # the (J, R, m) runs read above
        print("ground truth noise: " + ", ".join(f"{k} {v:.3f}" for k, v in rel.items()))
    print(f"total {time.time() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def other_methods(cfg, cache: Path, k: int, masks, outputs, folds) -> dict[str, dict]:
    """TracInCP over 4 checkpoints of one run, Grad-Cos and RepSim on its final model."""
    try:
        from tda.featurizers.representations import RepresentationFeaturizer
        from tda.scorers import GradCosScorer, RepSimScorer, TracInCPScorer
    except ImportError as exc:
        print(f"(TracIn/Grad-Cos/RepSim skipped: {exc})")
        return {}
    rows = {}
    epochs = torch.load(cache / "models" / "full-00-epochs.pt", weights_only=True)
    e = cfg.train.epochs
    picks = sorted({int(round(x)) for x in np.linspace(0, e - 1, 4)})
    lrs = [cfg.train.lr * (1 - p / e) for p in picks]
    train, query = featurize(cfg, [epochs[p] for p in picks], k, "tracin-ckpts", cache)
    src = ArrayFeatures(train, range(len(picks)))
    rows[f"TracInCP ({len(picks)} ckpts)"] = evaluate(score_matrix(query, TracInCPScorer(lrs).fit(src), src),
                                                      masks, outputs, folds, tuned=False)
    last = ArrayFeatures(first(FeatureBlock(train.ids, train.feats[-1:], train.q[-1:]), 1), [0])
    qlast = FeatureBlock(query.ids, query.feats[-1:], query.q[-1:])
    rows["Grad-Cos (final ckpt)"] = evaluate(score_matrix(qlast, GradCosScorer().fit(last), last),
                                             masks, outputs, folds, tuned=False)
    data = datasets_for(cfg)
    rf = RepresentationFeaturizer(build_model(cfg), "1")
    blocks = {}
    for split in ("train", "query"):
        b = as_numpy_batch(data[split])
        parts = list(rf.featurize(epochs[-1], 0, [(np.arange(len(b["y"])), b)]))
        blocks[split] = FeatureBlock(parts[0][0], parts[0][1][None], parts[0][2][None])
    rsrc = ArrayFeatures(blocks["train"], [0])
    rows["RepSim (hidden layer, cosine)"] = evaluate(score_matrix(blocks["query"], RepSimScorer().fit(rsrc), rsrc),
                                                     masks, outputs, folds, tuned=False)
    return rows


if __name__ == "__main__":
    main()
