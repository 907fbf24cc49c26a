"""``tda curate CONFIG``: rank training examples as suspected mislabelled or outlying.

On a finished run it computes, per training example, the self-influence under every gradient
scorer that reads the run's features (TRAK, TracInCP, Grad-Dot), of the training loss by default
(``curate.self_influence: loss``, :func:`tda.workflows.curation.loss_self_influence`; ``output``: of the
measured output f, :func:`tda.workflows.curation.self_influence`; EK-FAC's is of f),
the baselines a user compares against (training loss and ``1 - p(label)`` averaged over every
attributed checkpoint), and rank ensembles (the mean of normalised ranks): ``trak+loss`` and
``trak+loss+confidence``, the default (on MNIST MLP and CIFAR-2 CNN at 10 % noise the only ranking
at or above the best baseline on both, ``benchmarks/curation.py``). With ``data.label_noise`` (a seeded share of training labels flipped) it measures every
ranking against the flipped labels. The check retrains without the top ``curate.remove_fraction``
flagged and without a random share (:mod:`pipelines.workflows.curate_check`).

Outputs in ``curation/``: ``ranking.csv`` and ``ranking.parquet`` (most suspect first: id, label,
predicted label, a column per method) and ``curation.json``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from stores import FeatureStore, workflow_results
from stores._io import atomic_write
from tda.workflows.curation import detection_metrics, loss_self_influence, rank_average, self_influence
from tda.errors import CheckpointError, ConfigError

from pipelines.families import family_for
from pipelines.layout import RunPaths
from pipelines.spec.schema import RunConfig
from pipelines.spec.method import method_for, self_influence_methods
from pipelines.spec.workflows import CURATION_BASELINES as BASELINES, CURATION_ENSEMBLES as ENSEMBLES
from pipelines.stages.validate_scorers import scorer_for, usable_scorers

logger = logging.getLogger(__name__)


def _self_influences(cfg: RunConfig, paths: RunPaths, wanted: set[str], rows: dict[int, int]) -> dict[str, np.ndarray]:
    """Self-influence of every wanted gradient scorer that scores the run's stored features, in row order."""
    train, usable, out = FeatureStore.open(paths.store("train")), usable_scorers(cfg), {}
    for name in self_influence_methods():
        if name not in wanted or name not in usable:
            continue
        try:
            scorer = scorer_for(cfg, paths, name, train)
        except CheckpointError as exc:  # e.g. TracIn without recorded learning rates: skip a method not asked for
            if cfg.curate.methods is not None and name in cfg.curate.methods:
                raise
            logger.warning("curate: %s self-influence skipped (%s)", name, exc)
            continue
        if method_for(name).preconditioned_queries:  # the training set through the query featurizer
            ids, values = ekfac_self_influence(cfg, paths, scorer, train)
        elif cfg.curate.self_influence == "loss":  # the loss gradient Q grad f (benchmarks/self_influence.py)
            ids, values = loss_self_influence(scorer, train)
        else:
            ids, values = self_influence(scorer, train)
        col = np.full(len(rows), np.nan)
        col[[rows[int(i)] for i in ids]] = values
        out[name] = col
    return out


def ekfac_self_influence(cfg: RunConfig, paths: RunPaths, scorer: Any, train: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """EK-FAC self-influence ``Q_i grad f_i^T H^-1 grad f_i``: the training set featurized by the
    run's preconditioned query featurizer (factors refitted on it), against its stored train side."""
    from tda.scorers.ekfac.features import featurize_data

    from pipelines.layout import load_checkpoint_list
    from pipelines.run import make_featurizer

    family, entries = family_for(cfg), load_checkpoint_list(paths)
    order = {int(e["id"]): e for e in entries}
    ckpts = [int(c) for c in train.checkpoints]
    block = featurize_data(make_featurizer(cfg, "query", paths), [paths.checkpoint_file(order[c]) for c in ckpts],
                           ckpts, family.datasets(cfg, paths)["train"], family.collate(cfg), cfg.featurize.batch_size)
    return self_influence(scorer, train, query=block)


def rankings(cfg: RunConfig, paths: RunPaths) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(methods, predictions)``: each method's suspect score per training row (higher: more
    suspect) and the family's per-example ``labels``, ``predicted``, ``loss``, ``confidence``."""
    family = family_for(cfg)
    if not hasattr(family, "example_predictions"):
        raise ConfigError(f"tda curate needs per-example predictions and losses; the {family.name!r} family has "
                          "none (its task is neither a classifier nor a causal LM)")
    preds = family.example_predictions(cfg, paths)
    wanted = set(cfg.curate.methods or (*self_influence_methods(), *BASELINES, *ENSEMBLES))
    for parts in (ENSEMBLES[m] for m in wanted & set(ENSEMBLES)):
        wanted |= set(parts)
    ids = preds["ids"]
    methods = _self_influences(cfg, paths, wanted, {int(i): r for r, i in enumerate(ids)})
    methods.update({name: preds[name] for name in BASELINES if name in wanted})
    for name, parts in ENSEMBLES.items():
        if name in wanted and all(p in methods for p in parts):
            methods[name] = rank_average([methods[p] for p in parts])
    if cfg.curate.method not in methods:
        raise ConfigError(f"curate.method {cfg.curate.method!r} cannot be computed on this run (available: "
                          f"{sorted(methods)}); choose one of those")
    return methods, preds


def flipped_rows(cfg: RunConfig, paths: RunPaths) -> np.ndarray | None:
    """Training rows ``data.label_noise`` changed: a flipped label, or (an LM) a shuffled
    sequence (None without ``data.label_noise``)."""
    if not cfg.data.label_noise:
        return None
    from pipelines.families.base import collated

    family = family_for(cfg)
    key = getattr(family.task(cfg), "label_key", None) or getattr(family, "label_key", None) or "input_ids"
    clean_cfg = replace(cfg, data=replace(cfg.data, label_noise=0.0))
    clean, noisy = (collated(family.datasets(c, paths)["train"], family.collate(cfg))[key].numpy() for c in (clean_cfg, cfg))
    changed = clean != noisy
    return changed.reshape(len(changed), -1).any(axis=1)


def write_ranking(folder, methods: dict[str, np.ndarray], preds: dict[str, np.ndarray], flipped,
                  order: np.ndarray) -> None:
    """``ranking.csv`` and ``ranking.parquet`` in ``order`` (rows, most suspect first)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = {"rank": np.arange(1, len(order) + 1), "id": preds["ids"][order], "label": preds["labels"][order],
            "predicted": preds["predicted"][order]}
    if flipped is not None:
        cols["flipped"] = flipped[order]
    cols.update({name: values[order] for name, values in methods.items()})
    table = pa.table(cols)
    atomic_write(folder / "ranking.parquet", lambda p: pq.write_table(table, p))
    atomic_write(folder / "ranking.csv", lambda p: pacsv.write_csv(table, p))


def stage_curate(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, Any]:
    """Rankings, noise metrics, the retraining check; writes ``curation/`` and returns curation.json."""
    methods, preds = rankings(cfg, paths)
    folder = paths.root / "curation"
    folder.mkdir(exist_ok=True)
    flipped = flipped_rows(cfg, paths)
    lead = cfg.curate.method
    order = np.argsort(-methods[lead], kind="stable")  # most suspect first
    write_ranking(folder, methods, preds, flipped, order)
    result: dict[str, Any] = {"method": lead, "n_train": len(preds["ids"]), "methods": {}}
    if flipped is not None:
        result["label_noise"] = {"fraction": cfg.data.label_noise, "seed": cfg.data.seed, "flipped": int(flipped.sum())}
        result["methods"] = {name: detection_metrics(values, flipped) for name, values in methods.items()}
        best = max((m for m in BASELINES if m in methods), key=lambda m: result["methods"][m]["auc"], default=None)
        if best is not None:
            result["best_baseline"] = best
            result["method_matches_best_baseline"] = bool(result["methods"][lead]["auc"] >= result["methods"][best]["auc"])
    else:
        result["methods"] = {name: {} for name in methods}
    if cfg.curate.retrain_seeds:
        from pipelines.workflows.curate_check import retrain_check

        family = family_for(cfg)
        if not hasattr(family, "accuracy_job"):
            raise ConfigError(f"the {family.name!r} family has no accuracy retraining yet; set curate.retrain_seeds: 0")
        result["check"] = retrain_check(cfg, family.accuracy_job(cfg), order, folder / "retrain", progress,
                                        family.check_metric_of(cfg))
    workflow_results.save(paths.root, "curation", result)
    return result


__all__ = ["BASELINES", "ENSEMBLES", "ekfac_self_influence", "flipped_rows", "rankings", "stage_curate", "write_ranking"]
