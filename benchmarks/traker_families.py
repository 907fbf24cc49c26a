"""tda's TRAK against MadryLab's traker and TRAIS-Lab's dattri TRAK per family, at equal M and k (issue 12).

On the cached runs and ground truth of benchmarks/projections.py (the dense and sparse `tda run`
folders of each family, classic protocol, one shared ground truth), traker 0.3.x and dattri 0.3.x
score the very checkpoints the tda runs attributed (one per model: M = train.models), the same
training set in store order (the ground-truth masks index it), the same queries and k =
featurize.k, with their own defaults: traker's task "image_classification", dense CPU projector,
lambda_reg 0; dattri's TRAKAttributor with its CPU Gaussian projector and regularization 0.0, given
the same f as tda and traker, the margin log(p/(1-p)) (benchmarks/dattri_trak.py). Their LDS is
measured on the validator's folds (report and tuning) with the same bootstrap, next to tda's dense
and sparse (the default) TRAK with the automatic ridge; then once more with tda's ridge passed in
(both expose one lambda added to X^T X: lambda_rel x mean diag of their own kernel).

Self-check first: the LDS of each tda run's scores/scores.npy on the report fold must equal the
trak entry of its validation/validation.json (within 1e-6), so all libraries are measured by the
same code on the same ground truth. traker's and dattri's scores are cached (keyed by the
checkpoints' sha256, k, the set sizes and the library version) under --cache, so a rerun only
re-reads them.

The char LM family is not measured: traker has no causal-LM task (only image_classification,
clip, text_classification and iterative_image_classification), so it would need a model-output
class of our own, which would no longer be traker's TRAK.

dattri declares no torch (so it keeps the installed one) but pretty_midi, which its TRAK never
imports (it needs torch, numpy, scipy and tqdm): pip install --no-deps dattri

    python benchmarks/traker_families.py                        # MNIST MLP and CIFAR-2 CNN
    python benchmarks/traker_families.py --families mnist_mlp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.families import family_for  # noqa: E402
from pipelines.families.base import collated  # noqa: E402
from pipelines.layout import RunPaths, load_checkpoint_list  # noqa: E402
from pipelines.run_folder import recorded_config  # noqa: E402
from pipelines.stages.validate import ground_truth_for, retrain_job  # noqa: E402
from tda.featurizers.gradient import load_checkpoint  # noqa: E402
from tda.validation import lds, split_folds  # noqa: E402
from tda.validation.metrics import spearman_columns  # noqa: E402

from dattri_trak import dattri_scores, dattri_version, geometric_mean  # noqa: E402  (sibling benchmark module)

FAMILIES = ("mnist_mlp", "cifar2_cnn")
PROJECTIONS = ("sparse", "dense")
LABELS = {"mnist_mlp": "MNIST MLP", "cifar2_cnn": "CIFAR-2 CNN"}
BATCH = 250


def run_paths(projections: Path, family: str, projection: str) -> RunPaths:
    """The finished run folder, or a clear error naming the command that makes it."""
    root = projections / family / projection
    needed = [root / "run.json", root / "validation" / "validation.json", root / "scores" / "scores.npy",
              root / "checkpoints" / "checkpoints.json", root / "scorer" / "scorer.json", projections / family / "gt" / "manifest.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        what = "missing" if not root.is_dir() else f"incomplete ({missing[0]} and {len(missing) - 1} more missing)"
        raise SystemExit(f"{family}: the cached {projection} run {root} is {what}; make it with "
                         f"`python benchmarks/projections.py --only {family}`")
    return RunPaths(root)


def load_run(projections: Path, family: str, projection: str) -> dict:
    """Config (validation settings as the benchmark ran them), validation.json, scores, checkpoint entries."""
    paths = run_paths(projections, family, projection)
    val = json.loads((paths.root / "validation" / "validation.json").read_text())
    if val.get("protocol") != "classic":
        raise SystemExit(f"{paths.root}: validation protocol is {val.get('protocol')!r}, expected classic; rerun "
                         f"`python benchmarks/projections.py --only {family}`")
    cfg = recorded_config(paths)
    v = dataclasses.replace(cfg.validate, protocol="classic", subsets=val["subsets"],
                            ground_truth_dir=str(projections / family / "gt"))
    cfg = dataclasses.replace(cfg, validate=v)
    scores = np.load(paths.scores / "scores.npy").astype(np.float64)[: val["n_queries"]]
    return {"paths": paths, "cfg": cfg, "val": val, "scores": scores, "ckpts": load_checkpoint_list(paths)}


def ground_truth(run: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Masks (J, n), mean outputs (J, m) and folds, exactly as `tda validate` built them (read only)."""
    cfg, val = run["cfg"], run["val"]
    job = retrain_job(cfg, val["n_queries"])
    gt = ground_truth_for(cfg, run["paths"], val["n_train"], job)  # checks the spec against the cached manifest
    if gt.pending():
        raise SystemExit(f"{gt.store.root}: {len(gt.pending())} retrainings missing; rerun "
                         "`python benchmarks/projections.py` for this family")
    folds = split_folds(val["n_queries"], val["subsets"], cfg.validate.tune_fraction, cfg.validate.seed)
    return gt.masks, gt.mean_outputs(), folds


def fold_lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, folds: dict) -> dict:
    """LDS with bootstrap interval on the report fold and on the tuning fold."""
    out = {}
    for fold in ("report", "tune"):
        q, j = folds[f"{fold}_queries"], folds[f"{fold}_subsets"]
        out[fold] = lds(scores[q], masks[j], outputs[np.ix_(j, q)]).as_dict()
    return out


def self_check(run: dict, measured: dict, tol: float = 1e-6) -> float:
    """|LDS of scores.npy on the report fold - validation.json's trak entry|; raises above ``tol``."""
    want = run["val"]["scorers"]["trak"]["report"]["mean"]
    diff = abs(measured["report"]["mean"] - want)
    if not diff <= tol:
        raise SystemExit(f"self-check failed for {run['paths'].root}: scores.npy gives LDS "
                         f"{measured['report']['mean']:.6f} on the report fold, validation.json {want:.6f}")
    return diff


def train_query(cfg, paths: RunPaths, m: int) -> tuple[dict, dict]:
    """Training set in store order and the first ``m`` queries, collated with the family's collate."""
    family = family_for(cfg)
    data, collate = family.datasets(cfg, paths), family.collate(cfg)
    tr, qu = collated(data["train"], collate), collated(data["query"], collate)
    return tr, {k: v[:m] for k, v in qu.items()}


def traker_run(cfg, paths: RunPaths, ckpts: list[dict], k: int, m: int, work: Path,
               ridge_rel: float | None = None) -> np.ndarray:
    """traker TRAK over every attributed checkpoint; (n_train, m) as traker returns it. At its defaults
    (lambda_reg 0) unless ``ridge_rel``: then lambda_reg = ridge_rel x mean(diag(Phi^T Phi)) of its own
    features (geometric mean over models; traker takes one lambda for all), tda's ridge convention."""
    from trak import TRAKer

    tr, qu = train_query(cfg, paths, m)
    n = len(tr["y"])
    model = family_for(cfg).build_model(cfg).eval()
    states = [load_checkpoint(paths.checkpoint_file(e)) for e in ckpts]
    save = Path(tempfile.mkdtemp(prefix="traker-", dir=work))
    try:
        traker = TRAKer(model=model, task="image_classification", train_set_size=n, proj_dim=k, device="cpu",
                        use_half_precision=False, save_dir=str(save), logging_level=40)
        for i, st in enumerate(states):
            traker.load_checkpoint(st, model_id=i)
            for lo in range(0, n, BATCH):  # traker's image task calls model(x) with batch (x, y)
                x, y = tr["x"][lo: lo + BATCH], tr["y"][lo: lo + BATCH]
                traker.featurize(batch=(x, y), num_samples=len(y))
        if ridge_rel is not None:
            traker.score_computer.lambda_reg = ridge_rel * traker_scale(traker, len(states), k)
        traker.finalize_features()
        for i, st in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="q", checkpoint=st, model_id=i, num_targets=m)
            for lo in range(0, m, BATCH):
                traker.score(batch=(qu["x"][lo: lo + BATCH], qu["y"][lo: lo + BATCH]),
                             num_samples=len(qu["y"][lo: lo + BATCH]))
        scores = np.array(traker.finalize_scores(exp_name="q", model_ids=list(range(len(states)))), dtype=np.float64)
    finally:
        shutil.rmtree(save, ignore_errors=True)
    if scores.shape != (n, m):
        raise SystemExit(f"traker returned scores of shape {scores.shape}, expected (n_train, n_query) = {(n, m)}")
    return scores


def traker_scale(traker, models: int, k: int) -> float:
    """Geometric mean over models of mean(diag(Phi^T Phi)) of traker's stored (projected) gradients."""
    scales = []
    for i in range(models):
        traker.saver.load_current_store(i)
        g = np.asarray(traker.saver.current_store["grads"], dtype=np.float64)
        scales.append((g ** 2).sum() / k)
    return geometric_mean(scales)


def tda_ridge(run: dict) -> float:
    """The geometric mean of the per-checkpoint lambda_rel tda's automatic ridge chose in this run."""
    hyper = json.loads((run["paths"].scorer / "scorer.json").read_text())["hyperparameters"]
    return geometric_mean(hyper["chosen_lambda_rel"])


def run_key(run: dict, library: str, version: str, **more) -> dict:
    """What a library's cached scores depend on: checkpoints, k, set sizes, its version and batch."""
    cfg, val = run["cfg"], run["val"]
    return {"checkpoints": [e["sha256"] for e in run["ckpts"]], "k": cfg.featurize.k, "n_train": val["n_train"],
            "n_queries": val["n_queries"], library: version, "batch": BATCH, **more}


def cached_scores(cache: Path, tag: str, key: dict, threads: int, compute) -> tuple[np.ndarray, dict]:
    """(m, n) scores and their meta (wall_s, what ``compute`` adds) from ``cache``/``tag`` when made for
    the same ``key``; else ``compute()`` -> (raw (n_train, m) scores, extra meta), timed and stored."""
    import torch

    meta, data = cache / f"{tag}.json", cache / f"{tag}-scores.npy"
    if meta.is_file() and data.is_file() and json.loads(meta.read_text()).get("key") == key:
        return np.load(data), json.loads(meta.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    start = time.time()
    raw, extra = compute()
    info = {"key": key, "wall_s": time.time() - start, "raw_shape": list(raw.shape), **extra}
    scores = raw.T.copy()  # (m, n): tda's orientation, scores[q, i]
    np.save(data, scores)
    meta.write_text(json.dumps(info, indent=1))
    return scores, info


def traker_cached(run: dict, cache: Path, threads: int, ridge_rel: float | None = None) -> tuple[np.ndarray, float]:
    """traker's (m, n) scores and its wall time, from ``cache`` when made for the same inputs."""
    import trak

    cfg, val = run["cfg"], run["val"]
    key = run_key(run, "traker", getattr(trak, "__version__", "?"), ridge_rel=ridge_rel)
    tag = "traker" if ridge_rel is None else "traker-ridge"
    scores, info = cached_scores(cache, tag, key, threads, lambda: (
        traker_run(cfg, run["paths"], run["ckpts"], cfg.featurize.k, val["n_queries"], cache, ridge_rel), {}))
    return scores, info["wall_s"]


def dattri_cached(run: dict, cache: Path, threads: int, ridge_rel: float | None = None) -> tuple[np.ndarray, dict]:
    """dattri's (m, n) scores and meta (wall_s, regularization, per-model kernel scale), cached like traker's.
    At its default regularization (0.0) unless ``ridge_rel``: then regularization = ridge_rel x the
    geometric mean over models of mean(diag(Phi^T Phi)) of its own features (from its default run)."""
    cfg, val = run["cfg"], run["val"]
    reg = 0.0 if ridge_rel is None else ridge_rel * geometric_mean(dattri_cached(run, cache, threads)[1]["scales"])
    key = run_key(run, "dattri", dattri_version(), ridge_rel=ridge_rel, regularization=reg)

    def compute() -> tuple[np.ndarray, dict]:
        tr, qu = train_query(cfg, run["paths"], val["n_queries"])
        model = family_for(cfg).build_model(cfg).eval()
        states = [load_checkpoint(run["paths"].checkpoint_file(e)) for e in run["ckpts"]]
        raw, scales = dattri_scores(model, states, tr, qu, cfg.featurize.k, BATCH, reg)
        if raw.shape != (len(tr["y"]), len(qu["y"])):
            raise SystemExit(f"dattri returned scores of shape {raw.shape}, expected (n_train, n_query)")
        return raw, {"regularization": reg, "scales": scales}

    return cached_scores(cache, "dattri" if ridge_rel is None else "dattri-ridge", key, threads, compute)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation of two (m, n) score matrices' rows."""
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if not finite.any():
        return float("nan")
    return float(np.nanmean(spearman_columns(a[finite].T, b[finite].T)))


def columns(row: dict, name: str, scores: np.ndarray, wall: float, dense: dict, gt: tuple) -> None:
    """One library's LDS on both folds, wall time, finiteness and agreement with tda dense into ``row``."""
    row[name], row[f"{name}_wall_s"] = fold_lds(scores, *gt), wall
    row[f"{name}_finite"] = bool(np.isfinite(scores).all())
    row[f"{name}_spearman_vs_dense"] = agreement(scores, dense["scores"])


def measure(family: str, projections: Path, cache: Path, threads: int, ridge: bool = True) -> dict:
    """tda dense / sparse (self-checked), traker and dattri on one family's runs and ground truth."""
    runs = {p: load_run(projections, family, p) for p in PROJECTIONS}
    dense = runs["dense"]
    shas = {p: [e["sha256"] for e in r["ckpts"]] for p, r in runs.items()}
    if shas["dense"] != shas["sparse"]:
        raise SystemExit(f"{family}: the dense and sparse runs attributed different checkpoints; rerun "
                         f"`python benchmarks/projections.py --only {family}`")
    ks = {p: r["cfg"].featurize.k for p, r in runs.items()}
    if len(set(ks.values())) != 1:
        raise SystemExit(f"{family}: featurize.k differs between the runs ({ks})")
    gt = ground_truth(dense)
    row = {"family": family, "M": len(dense["ckpts"]), "k": ks["dense"], "n_train": dense["val"]["n_train"],
           "n_queries": dense["val"]["n_queries"], "subsets": dense["val"]["subsets"], "check": {}}
    for p, r in runs.items():
        row[p] = fold_lds(r["scores"], *gt)
        row["check"][p] = self_check(r, row[p])
    here = cache / family
    columns(row, "traker", *traker_cached(dense, here, threads), dense, gt)
    scores, info = dattri_cached(dense, here, threads)
    columns(row, "dattri", scores, info["wall_s"], dense, gt)
    if ridge:
        row["ridge_rel"] = tda_ridge(dense)
        columns(row, "traker_ridge", *traker_cached(dense, here, threads, row["ridge_rel"]), dense, gt)
        scores, info = dattri_cached(dense, here, threads, row["ridge_rel"])
        columns(row, "dattri_ridge", scores, info["wall_s"], dense, gt)
        row["dattri_regularization"] = info["regularization"]
    return row


def cell(x: dict, fold: str = "report") -> str:
    d = x[fold]
    return f"{d['mean']:.3f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]"


def print_table(rows: list[dict]) -> None:
    print("\nLDS (classic protocol, 95% bootstrap over queries); report fold, tuning fold below\n")
    print("| family | M | k | tda sparse (default) | tda dense | traker | dattri | wall s (traker, dattri) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"{LABELS[r['family']]} ({r['n_train']:,} train, {r['n_queries']} queries, {r['subsets']} subsets)"
        print(f"| {name} | {r['M']} | {r['k']} | {cell(r['sparse'])} | {cell(r['dense'])} | {cell(r['traker'])} "
              f"| {cell(r['dattri'])} | {r['traker_wall_s']:.1f}, {r['dattri_wall_s']:.1f} |")
        print(f"| (tuning fold) | | | {cell(r['sparse'], 'tune')} | {cell(r['dense'], 'tune')} "
              f"| {cell(r['traker'], 'tune')} | {cell(r['dattri'], 'tune')} | |")
    if any("traker_ridge" in r for r in rows):
        print("\nWith tda's ridge (lambda = the auto ridge's lambda_rel x mean diag of each library's own kernel)\n")
        print("| family | lambda_rel | tda dense | traker, tda's ridge | dattri, tda's ridge | wall s (traker, dattri) "
              "| Spearman vs tda dense (traker, dattri) |")
        print("|---|---|---|---|---|---|---|")
        for r in (r for r in rows if "traker_ridge" in r):
            print(f"| {LABELS[r['family']]} | {r['ridge_rel']:.3g} | {cell(r['dense'])} | {cell(r['traker_ridge'])} "
                  f"| {cell(r['dattri_ridge'])} | {r['traker_ridge_wall_s']:.1f}, {r['dattri_ridge_wall_s']:.1f} "
                  f"| {r['traker_ridge_spearman_vs_dense']:+.3f}, {r['dattri_ridge_spearman_vs_dense']:+.3f} |")
    print()
    for r in rows:
        print(f"{r['family']}: self-check |scores.npy LDS - validation.json| = {max(r['check'].values()):.1e}")
        for lib in ("traker", "dattri"):
            gap = {p: r[p]["report"]["mean"] - r[lib]["report"]["mean"] for p in PROJECTIONS}
            verdict = "at or above" if min(gap.values()) >= 0 else ("mixed vs" if max(gap.values()) >= 0 else "below")
            print(f"  tda {verdict} {lib} on the report fold (sparse {gap['sparse']:+.3f}, dense {gap['dense']:+.3f}); "
                  f"{lib} scores finite: {r[f'{lib}_finite']}; mean per-query Spearman {lib} vs tda dense "
                  f"{r[f'{lib}_spearman_vs_dense']:+.3f} (positive: same sign convention)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--projections", type=Path, default=Path.home() / ".cache" / "tda" / "projections",
                    help="cache of benchmarks/projections.py (read only)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "traker-families",
                    help="where traker's and dattri's scores are cached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ridge", action="store_true", help="skip the extra traker and dattri runs with tda's ridge")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    for family in args.families:
        rows.append(measure(family, args.projections, args.cache, args.threads, not args.no_ridge))
        print(f"{family}: done (traker {rows[-1]['traker_wall_s']:.1f} s, dattri {rows[-1]['dattri_wall_s']:.1f} s)",
              flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
