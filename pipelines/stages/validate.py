"""The validate stage: LDS and calibration of every scorer, fold-tuned lambda, removal curves, noise.

Retrainings run through an executor (local or dask) and are stored as they finish
(:mod:`pipelines.ground_truth`), so validation resumes after an interruption and its ground
truth is reused by every scorer. Figures state their fold: lambda is chosen on the tuning
fold (queries x subsets) only, and reported on the disjoint reporting fold.
"""

from __future__ import annotations

import logging

from pathlib import Path
from typing import Any

import numpy as np

from stores import FeatureStore, workflow_results
from stores._io import fingerprint
from tda.errors import CheckpointError, ConfigError
from tda.core.features import ArrayFeatures, FeatureBlock, concat_blocks
from tda.core.kernel import score_matrix
from tda.scorers import TRAKScorer
from tda.validation import brittleness, calibration_report, ground_truth_reliability, lds, removal_sets, score_noise, split_folds

from pipelines.executors import make_executor
from pipelines.families import Retraining, family_for
from pipelines.families.classifier import ClassifierSubsetJob
from pipelines.ground_truth import GroundTruth, GroundTruthSpec, ResultStore, job_fingerprint, run_seed  # noqa: F401
from pipelines.layout import RunPaths, fingerprint_version
from pipelines.spec.method import method_for
from pipelines.spec.schema import RunConfig
from pipelines.spec.fingerprints import SCORE_SECTIONS, section_fingerprint
from pipelines.stages.validate_scorers import scores_for, validation_scorers


class MNISTRetrainJob(ClassifierSubsetJob):
    """Train the run's classifier recipe on a subset of its training rows; the margins of its
    first ``n_queries`` queries (kept for the benchmarks; the stage uses :func:`retrain_job`)."""

    def __init__(self, cfg: RunConfig, n_queries: int) -> None:
        super().__init__(cfg, "query", n_queries)


logger = logging.getLogger(__name__)

def retrain_job(cfg: RunConfig, n_queries: int):
    """The family's subset retraining job measuring its first ``n_queries`` queries."""
    family = family_for(cfg)
    if not isinstance(family, Retraining):
        raise ConfigError(f"tda validate retrains the model on subsets, and the {family.name!r} family has no "
                          "retraining recipe; set train.factory to 'module:fn' with fn(model, dataset, seed) -> "
                          "state_dict")
    job = family.subset_job(cfg, "query")
    job.n_queries = n_queries
    return job


def trak_scores(train: ArrayFeatures | FeatureStore, query: FeatureBlock, lambda_rel: float) -> np.ndarray:
    return score_matrix(query, TRAKScorer(lambda_rel).fit(train), train)


def lambda_label(scorer: TRAKScorer) -> str:
    """``0.1``, or ``auto (0.93)`` with the geometric mean of the chosen per-checkpoint values."""
    if scorer.lambda_rel != "auto":
        return f"{scorer.lambda_rel:g}"
    return f"auto ({float(np.exp(np.log(scorer.chosen_lambda_rel).mean())):.3g})"


def tune_and_report(train: Any, query: FeatureBlock, masks: np.ndarray, outputs: np.ndarray,
                    grid: list[float], configured: float, folds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Choose lambda_rel on the tuning fold, report LDS on the reporting fold."""
    tq, rq, tj, rj = (folds[k] for k in ("tune_queries", "report_queries", "tune_subsets", "report_subsets"))
    tuning = {}
    for lam in grid:
        s = trak_scores(train, query.select(tq), lam)
        tuning[lam] = lds(s, masks[tj], outputs[np.ix_(tj, tq)]).mean
    best = max(tuning, key=lambda k: -np.inf if np.isnan(tuning[k]) else tuning[k])
    report = {}
    for label, lam in (("tuned", best), ("configured", configured)):
        scorer = TRAKScorer(lam).fit(train)
        s = score_matrix(query.select(rq), scorer, train)
        report[label] = {"lambda_rel": lam, "fold": "report", "label": lambda_label(scorer),
                         **lds(s, masks[rj], outputs[np.ix_(rj, rq)]).as_dict()}
    return {"tuning_fold_lds": {str(k): v for k, v in tuning.items()}, "chosen_lambda_rel": best, **report}


def noise_report(train: FeatureStore, query: FeatureBlock, lambda_rel: float) -> dict[str, Any] | None:
    """Signal to noise of TRAK-1 scores over the independently trained checkpoints."""
    if len(train.checkpoints) < 2:
        return None
    blocks = list(train.iter_blocks())
    full = FeatureBlock(np.concatenate([b.ids for b in blocks]), np.concatenate([b.feats for b in blocks], 1),
                        np.concatenate([b.q for b in blocks], 1))
    stack = []
    for m in range(len(train.checkpoints)):
        one = ArrayFeatures(FeatureBlock(full.ids, full.feats[m: m + 1], full.q[m: m + 1]), [m])
        stack.append(trak_scores(one, FeatureBlock(query.ids, query.feats[m: m + 1], query.q[m: m + 1]), lambda_rel))
    return score_noise(np.stack(stack)).as_dict()


def removal_curves(cfg: RunConfig, paths: RunPaths, scores: np.ndarray, executor: Any, progress: bool) -> dict[str, Any]:
    """Retrain without the top/random/bottom-k of each of the first queries; change in f and flip rate."""
    v = cfg.validate
    nq = min(v.removal_queries, scores.shape[0])
    n = scores.shape[1]
    job = retrain_job(cfg, nq)
    store = ResultStore(paths.root / "removal", {"job": job_fingerprint(cfg), "ks": v.removal_ks,
                                                 "queries": nq, "seeds": v.removal_seeds, "seed": v.seed,
                                                 "scores": fingerprint(scores[:nq].round(8).tolist())}, nq)
    items = [(f"full/r{r}", (np.arange(n), run_seed(v.seed, 2, r))) for r in range(v.removal_seeds)]
    for q in range(nq):
        for k in v.removal_ks:
            for mode in ("top", "random", "bottom"):
                keep = np.setdiff1d(np.arange(n), removal_sets(scores[q], k, mode, seed=v.seed + q))
                items += [(f"q{q}/k{k}/{mode}/r{r}", (keep, run_seed(v.seed, 2, r))) for r in range(v.removal_seeds)]
    store.run(job, items, executor, "removal", progress)
    base = np.stack([store.load(f"full/r{r}") for r in range(v.removal_seeds)])  # (R, nq)
    curves: dict[str, Any] = {"ks": v.removal_ks, "modes": {}}
    for mode in ("top", "random", "bottom"):
        delta = np.zeros((nq, len(v.removal_ks)))
        flip = np.zeros((nq, len(v.removal_ks)))
        for q in range(nq):
            for a, k in enumerate(v.removal_ks):
                out = np.array([store.load(f"q{q}/k{k}/{mode}/r{r}")[q] for r in range(v.removal_seeds)])
                delta[q, a] = float((out - base[:, q]).mean())
                flip[q, a] = float((np.sign(out) != np.sign(base[:, q])).mean())
        curves["modes"][mode] = {"mean_change": delta.mean(0).tolist(), "flip_rate": flip.mean(0).tolist(),
                                 "per_query_change": delta.tolist()}
        if mode == "top":
            curves["brittleness"] = brittleness(flip >= 0.5, np.array(v.removal_ks)).tolist()
    return curves


def ground_truth_for(cfg: RunConfig, paths: RunPaths, n: int, job: Any) -> GroundTruth:
    """The validation's ground truth under ``validate.protocol`` (classic or small-drop)."""
    v = cfg.validate
    small = v.protocol == "small-drop"
    spec = GroundTruthSpec(n=n, m=job.n_queries, n_subsets=v.subsets, models_per_subset=1 if small else v.models_per_subset,
                           alpha=1.0 - v.drop_fraction if small else v.alpha, seed=v.seed, job=job_fingerprint(cfg),
                           protocol=v.protocol, fixed_seed=cfg.train.seed if small else 0,
                           batch_order=job.batch_order if small else "")
    return GroundTruth(Path(v.ground_truth_dir) if v.ground_truth_dir else paths.root / "ground-truth", spec,
                       references=True)


def scorer_report(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, full: np.ndarray,
                  folds: dict[str, np.ndarray]) -> dict[str, Any]:
    """LDS on the reporting fold and on everything, and the magnitude calibration."""
    rq, rj = folds["report_queries"], folds["report_subsets"]
    return {"report": lds(scores[rq], masks[rj], outputs[np.ix_(rj, rq)]).as_dict(),
            "all": lds(scores, masks, outputs).as_dict(),
            "calibration": calibration_report(scores, masks, outputs, full, folds)}


def measure_scorers(cfg: RunConfig, paths: RunPaths, names: list[str], train: FeatureStore, query: FeatureBlock,
                    truth: tuple[np.ndarray, np.ndarray, np.ndarray], folds: dict[str, np.ndarray],
                    result: dict[str, Any]) -> np.ndarray:
    """Every validated scorer on one ground truth ``(masks, outputs, full-set outputs)`` (TRAK also
    with its tuned ridge); returns the scores removal curves use (TRAK tuned, else the run's scorer)."""
    masks, outputs, full = truth
    result["scorers"] = {}
    main = None
    for name in names:
        try:
            s = scores_for(cfg, paths, name, train, query)
        except CheckpointError as exc:  # e.g. TracIn without recorded learning rates: skip a scorer not asked for
            if cfg.validate.scorers is not None or name == cfg.score.scorer:
                raise
            logger.warning("validate: %s skipped (%s)", name, exc)
            result.setdefault("skipped", {})[name] = str(exc)
            continue
        result["scorers"][name] = scorer_report(s, masks, outputs, full, folds)
        main = s if main is None else main
    if any(method_for(name).tuned_ridge for name in names):
        v = cfg.validate
        result["lds"] = tune_and_report(train, query, masks, outputs, v.lambda_grid, cfg.score.lambda_rel, folds)
        result["noise"] = noise_report(train, query, cfg.score.lambda_rel)
        main = trak_scores(train, query, result["lds"]["chosen_lambda_rel"])
        result["scorers"]["trak (tuned)"] = scorer_report(main, masks, outputs, full, folds)
    return main


def stage_validate(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, Any]:
    """Ground truth (resumable) under the configured protocol; LDS and calibration of every
    validated scorer on folds, TRAK's tuned ridge and noise, optional removal curves; writes validation/."""
    v = cfg.validate
    names = validation_scorers(cfg)  # a bad validate.scorers fails before any retraining
    train, query_store = FeatureStore.open(paths.store("train")), FeatureStore.open(paths.store("query"))
    job = retrain_job(cfg, 0)
    m = min(v.queries or len(query_store), len(query_store), job.available_queries())
    job.n_queries, job.weighted = m, v.protocol == "small-drop"
    query = concat_blocks(list(query_store.iter_blocks())).select(slice(0, m))  # every shard
    gt = ground_truth_for(cfg, paths, len(train), job)
    e = cfg.executor
    with make_executor(e.kind, e.address, e.workers) as executor:
        gt.compute(job, executor, progress)
        folds = split_folds(m, v.subsets, v.tune_fraction, v.seed)
        result = {"scores_fingerprint": section_fingerprint(cfg, *SCORE_SECTIONS, outputs=False,
                                                            version=fingerprint_version(paths)),
                  "protocol": v.protocol, "n_train": len(train), "n_queries": m, "subsets": v.subsets,
                  "alpha": gt.spec.alpha, "models_per_subset": gt.spec.models_per_subset,
                  "checkpoints": len(train.checkpoints), "folds": {k: len(x) for k, x in folds.items()},
                  "ground_truth": {"batch_order": job.batch_order,
                                   "fixed_seed": gt.spec.fixed_seed if job.weighted else None,
                                   "retrainings": gt.retrainings()}}
        runs = gt.outputs()  # (J, R, m), read (and checked against their sha256) once
        outputs = runs.mean(axis=1)
        if runs.shape[1] >= 2:  # how far retraining noise caps any scorer's LDS: a property of the recipe,
            # estimated on every subset and query (the report fold alone has half of each: noisier, and the
            # clipping of negative agreements at 0 biases a noisy estimate up)
            result["ground_truth"]["noise"] = ground_truth_reliability(runs).as_dict()
        scores = measure_scorers(cfg, paths, names, train, query, (gt.masks, outputs, gt.full_outputs()), folds,
                                 result)
        if any(method_for(name).linearity_check for name in names):  # linear enough for a first-order prediction?
            from pipelines.stages.validate_linearity import linearity_check

            result["linearity"] = linearity_check(cfg, paths, job, gt, executor, progress)
        if v.removal_queries:
            result["removal"] = removal_curves(cfg, paths, scores, executor, progress)
    from pipelines.stages.recipe_check import recipe_check

    check = recipe_check(cfg, paths, gt.full_outputs())
    if check is not None:
        result["recipe"] = check
    out = paths.root / "validation"
    workflow_results.save(paths.root, "validation", result)
    if v.plots:
        from pipelines.plots import plot_validation

        plot_validation(out, result, scores, gt.masks, outputs)
    return result
