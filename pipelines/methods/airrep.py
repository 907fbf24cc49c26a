"""AirRep in the pipeline: subset-retraining supervision for the learned representation scorer.

When the index stage fits ``score.scorer: airrep`` (docs/methods.md section 5, :mod:`tda.scorers.airrep.head`):

1. the family's AirRep training queries (:meth:`~pipelines.families.Family.airrep_queries`) are
   checked disjoint from the training set and the run's evaluation queries (by provenance keys;
   :class:`tda.errors.LeakageError` otherwise) *before* anything is retrained, and the check is
   recorded in ``provenance.json``;
2. ``score.options.subsets`` random subsets of the training set (fraction ``alpha``) are
   retrained with the family's subset job (:mod:`pipelines.subset_jobs`, ``subset_epochs``
   epochs) through the configured executor, each result stored as it finishes
   (:class:`~pipelines.ground_truth.GroundTruth`: an interrupted run resumes without redoing
   finished retrainings);
3. the training queries are featurized with the run's representation featurizer under every
   attributed checkpoint, and the head is trained on the result.

Results live in ``<data_dir>/<fingerprint>/`` (``data_dir`` = ``score.options.data_dir``, default
``<out_dir>/airrep``); the fingerprint covers the training recipe, the subset epochs, the queries
and the subsets, so runs that share ``data_dir`` and these settings share the retrainings.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stores._io import fingerprint, save_json
from tda.scorers.airrep.head import AirRepData, check_disjoint
from tda.data.loading import example_ids, iter_batches
from tda.errors import ConfigError
from tda.scorers import AirRepScorer

from pipelines.executors import make_executor
from pipelines.families import family_for
from pipelines.ground_truth import GroundTruth, GroundTruthSpec, job_fingerprint, run_seed
from pipelines.layout import RunPaths, load_checkpoint_list
from pipelines.spec.options import score_options

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)
#: AirRep's subsets and retraining seeds come from ``run_seed(score.options.seed, AIRREP_STREAM)``,
#: a stream apart from the validator's (``validate.seed``), so they never coincide with the
#: subsets an LDS evaluation uses.
AIRREP_STREAM = 3


def airrep_spec(cfg: RunConfig, n_train: int, n_queries: int, query_keys: list[str]) -> GroundTruthSpec:
    """The retraining spec of a run's AirRep supervision (recipe, epochs and the queries' provenance
    keys hashed in ``job``; a text query has one key per character)."""
    o = score_options(cfg, family_for(cfg))
    job = fingerprint({"recipe": job_fingerprint(cfg), "family": cfg.model.family, "epochs": o.subset_epochs,
                       "queries": fingerprint(query_keys)})
    return GroundTruthSpec(n=n_train, m=n_queries, n_subsets=o.subsets, models_per_subset=1, alpha=o.alpha,
                           seed=run_seed(o.seed, AIRREP_STREAM), job=job)


def airrep_ground_truth(cfg: RunConfig, paths: RunPaths | None, n_train: int, n_queries: int,
                        query_keys: list[str]) -> GroundTruth:
    """The (resumable) retraining results of the AirRep supervision, in their shareable folder."""
    o = score_options(cfg, family_for(cfg))
    spec = airrep_spec(cfg, n_train, n_queries, query_keys)
    if o.data_dir is None and paths is None:
        raise ConfigError("AirRep retraining results need score.options.data_dir or a run folder")
    base = Path(o.data_dir) if o.data_dir else paths.root / "airrep"
    return GroundTruth(base / fingerprint(asdict(spec)), spec)


def featurize_queries(cfg: RunConfig, paths: RunPaths, queries: Any) -> np.ndarray:
    """(M, Q, H) representations of the training queries under every attributed checkpoint."""
    family = family_for(cfg)
    featurizer = family.featurizer(cfg, "query", "representations", paths)
    per_ckpt = []
    for entry in load_checkpoint_list(paths):
        batches = iter_batches(queries, family.collate(cfg), cfg.featurize.batch_size)
        parts = list(featurizer.featurize(paths.checkpoint_file(entry), entry["id"], batches))
        per_ckpt.append(np.concatenate([p[1] for p in parts]))
    return np.stack(per_ckpt)


def airrep_retrain(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> tuple[GroundTruth, dict, Any, Any]:
    """Check disjointness, run or resume the subset retrainings (the retrain stage); returns the
    ground truth, the provenance keys, the run's data sets and the AirRep training queries."""
    if paths is None:
        raise ConfigError("AirRep supervision is computed in a run folder; fit it through `tda run` (the retrain stage)")
    family = family_for(cfg)
    o = score_options(cfg, family)
    data, queries = family.datasets(cfg, paths), family.airrep_queries(cfg)
    keys = {"train": family.provenance(cfg, "train", paths), "queries": family.provenance(cfg, "airrep", paths),
            "evaluation": family.provenance(cfg, "query", paths)}
    check_disjoint(keys["queries"], {"training examples": keys["train"], "evaluation queries": keys["evaluation"]})
    gt = airrep_ground_truth(cfg, paths, len(data["train"]), len(queries), keys["queries"])
    ids = example_ids(queries)
    save_json(gt.store.root / "provenance.json", {
        "disjoint": True, "train": len(data["train"]), "queries": len(queries), "query_ids": [int(ids[0]), int(ids[-1])],
        "keys": {role: {"count": len(k), "first": k[0], "last": k[-1]} for role, k in keys.items() if k},
        "subset_epochs": o.subset_epochs})
    e = cfg.executor
    if gt.pending():
        logger.info("AirRep: %d subset retrainings to run in %s", len(gt.pending()), gt.store.root)
        with make_executor(e.kind, e.address, e.workers) as executor:
            gt.compute(family.subset_job(cfg, "airrep", o.subset_epochs), executor, progress)
    return gt, keys, data, queries


def airrep_supervision(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> AirRepData:
    """The retrainings (:func:`airrep_retrain`, reused when done) and the training queries' features."""
    gt, keys, data, queries = airrep_retrain(cfg, paths, progress)
    ids = example_ids(queries)
    return AirRepData(train_ids=example_ids(data["train"]), query_feats=featurize_queries(cfg, paths, queries),
                      query_ids=ids, masks=gt.masks, outputs=gt.mean_outputs(), provenance=keys)


def airrep_scorer(cfg: RunConfig, paths: RunPaths | None) -> AirRepScorer:
    """The run's AirRep scorer; its supervision is computed only when it is fitted."""
    o = score_options(cfg, family_for(cfg))
    return AirRepScorer(data=lambda progress=True: airrep_supervision(cfg, paths, progress), head=o.head_config())


__all__ = ["airrep_ground_truth", "airrep_retrain", "airrep_scorer", "airrep_spec", "airrep_supervision", "featurize_queries"]
