"""The featurize stage: the train and query splits into their feature stores.

One job per (checkpoint x shard); jobs run on the configured executor (in process, or on a dask
cluster), each writing its shard's files atomically, and the driver records each shard in the
manifest as it arrives, so an interrupted run redoes only the jobs in flight.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stores import FeatureStore
from stores._io import remove_tree
from stores.feature_store import write_shard_files
from tda.data.loading import iter_batches
from tda.errors import CheckpointError, StoreError

from pipelines.executors import make_executor
from pipelines.families.base import decide_projection
from pipelines.families.registry import family_for
from pipelines.layout import RunPaths, checkpoint_digest, fingerprint_version, json_field, load_checkpoint_list
from pipelines.run import collate_for, datasets_for, feature_fingerprint, feature_kind, make_featurizer
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)


def open_store(cfg: RunConfig, paths: RunPaths, split: str, n: int, spec: dict, k: int | None = None) -> FeatureStore:
    """The split's store; ``k`` is the feature width (default ``featurize.k``)."""
    f = cfg.featurize
    ckpts = load_checkpoint_list(paths)
    version = fingerprint_version(paths)  # the run folder's scheme: an older folder keeps its stores
    fp = feature_fingerprint(cfg, split, version) + f"-{split}"
    folder, scheme = paths.store(split), ({"fingerprint_version": version} if version >= 2 else {})
    if split == "query" and folder.is_dir() and json_field(folder / "manifest.json", "fingerprint") != fp:
        # the queries changed, or a replacement was killed half-way (no readable manifest left):
        # query features are derived data and we hold the run lock
        logger.info("the queries changed: replacing %s", folder)
        remove_tree(folder)
    return FeatureStore.create(paths.store(split), n=n, k=k or f.k, checkpoints=[c["id"] for c in ckpts],
                               shard_size=f.shard_size, fingerprint=fp, spec={**spec, "split": split, **scheme},
                               dtype=f.dtype)


def stage_featurize(cfg: RunConfig, paths: RunPaths, progress: bool = True,
                    executor: Any = None, stats: dict[str, Any] | None = None) -> dict[str, FeatureStore]:
    """Featurize the train and query splits into their stores, one job per (checkpoint, shard).

    Jobs run on ``executor`` (default: the one ``cfg.executor`` names: in this process, or on a
    dask cluster). Each job loads the model, checkpoint and data from paths, featurizes its rows
    and writes the shard's files atomically; this process checks and records each finished shard
    in the manifest as it arrives, so an interrupted run redoes only jobs in flight. Every
    executor runs the same job code on the same batches, so stores are identical. ``stats``, if
    given, receives per split the jobs and rows computed by this call (the rest were reused).
    """
    own = executor is None
    if own:
        e = cfg.executor
        executor = make_executor(e.kind, e.address, e.workers)
    try:
        return _featurize_splits(cfg, paths, progress, executor, {} if stats is None else stats)
    finally:
        if own:
            executor.close()


def _featurize_splits(cfg: RunConfig, paths: RunPaths, progress: bool, executor: Any,
                      stats: dict[str, Any]) -> dict[str, FeatureStore]:
    data = datasets_for(cfg, paths)
    entries = {c["id"]: c for c in load_checkpoint_list(paths)}
    fcfg = _with_projection(cfg, paths, data["train"], stats)
    stores = {}
    verified: set[int] = set()
    local = getattr(executor, "name", "") == "local"
    for split in ("train", "query"):
        featurizer = make_featurizer(fcfg, split, paths)  # the family may featurize splits differently
        store = open_store(cfg, paths, split, len(data[split]), featurizer.spec(),
                           getattr(featurizer, "feature_dim", None))
        store.remove_orphans()  # temporary files of a writer that was killed (we hold the run lock)
        stores[split] = store
        pending = store.pending()
        for c in sorted({c for c, _ in pending} - verified):
            _verify_checkpoint(paths.checkpoint_file(entries[c]), entries[c])
            verified.add(c)
        store.drop_unrecorded_ids({s for _, s in pending})  # written by a job whose record never came
        rows = {s: hi - lo for s in {s for _, s in pending} for lo, hi in [store.shard_rows(s)]}
        todo = sum(rows[s] for _, s in pending)
        stats[split] = {"jobs": len(pending), "rows": todo, "examples": len(store), "checkpoints": len(store.checkpoints)}
        bar = tqdm(total=todo, desc=f"featurize {split}", unit="ex", disable=not progress or not pending)
        layout = {key: store.manifest[key] for key in ("n", "shard_size", "k", "dtype")}
        job = FeaturizeJob(cfg.to_dict(), str(paths.root.resolve()), split, layout, {c: entries[c]["file"] for c in entries})
        if local:  # same job in this process: reuse the featurizer built above, count rows per batch
            job.bind(cfg, featurizer, data[split], bar.update)
        try:
            for (c, s), records in executor.map_unordered(job, pending):
                store.record(records)
                if not local:
                    bar.update(rows[s])
        finally:
            bar.close()
            featurizer.projector.clear_cache()
    return stores


def _with_projection(cfg: RunConfig, paths: RunPaths, train: Any, stats: dict[str, Any]) -> RunConfig:
    """``cfg`` with ``featurize.projection: auto`` replaced by what it means for this run's model
    (decided once, before the first store exists: afterwards the stored spec says it, so the
    fingerprint keeps ``auto`` and workers read the choice from the train store's manifest)."""
    family = family_for(cfg)
    if cfg.featurize.projection != "auto" or feature_kind(cfg, family) == "representations":
        return cfg
    choice = decide_projection(cfg, paths, family, train)
    stats["projection"] = {"projection": choice.projection, "reason": choice.reason}
    return replace(cfg, featurize=replace(cfg.featurize, projection=choice.projection))


class FeaturizeJob:
    """Featurize one ``(checkpoint, shard)`` of a split and write its files; returns their records.

    Picklable and small: it carries the config as a plain dict, the run folder's path, the
    store's layout (``n``, ``shard_size``, ``k``, ``dtype``) and the checkpoint file names; a
    worker builds the featurizer and data set once per process (cached) and loads the checkpoint
    from the run folder. It never touches the manifest (the driver records what it returns).
    """

    def __init__(self, config: dict[str, Any], root: str, split: str, layout: dict[str, Any],
                 checkpoint_files: dict[int, str]) -> None:
        self.config, self.root, self.split = config, root, split
        self.layout, self.checkpoint_files = layout, checkpoint_files
        self._bound: tuple[Any, Any, Any, Any] | None = None

    def bind(self, cfg: RunConfig, featurizer: Any, dataset: Any, on_rows: Any) -> None:
        """Run in this process with the parsed config, an existing featurizer and data set,
        reporting rows as they finish."""
        self._bound = (cfg, featurizer, dataset, on_rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bound": None}

    def __call__(self, item: tuple[int, int]) -> dict[str, dict]:
        checkpoint, shard = item
        paths = RunPaths(Path(self.root))
        if self._bound is None:  # first job of this worker process for this job object
            from pipelines.config import parse_config

            torch.set_num_threads(1)  # one job per worker thread; no oversubscription
            cfg = parse_config(self.config)
            self._bound = (cfg, _worker_featurizer(cfg, paths, self.split), datasets_for(cfg, paths)[self.split], None)
        cfg, featurizer, dataset, on_rows = self._bound
        n, size, k = self.layout["n"], self.layout["shard_size"], self.layout["k"]
        lo, hi = shard * size, min(n, (shard + 1) * size)
        batches = iter_batches(dataset, collate_for(cfg), cfg.featurize.batch_size, lo, hi)
        if on_rows is not None:
            batches = _counting(batches, on_rows)
        parts = list(featurizer.featurize(paths.checkpoint_file({"file": self.checkpoint_files[checkpoint]}), checkpoint, batches))
        ids, feats, q = (np.concatenate(p) for p in zip(*parts))
        if feats.shape != (hi - lo, k):
            raise StoreError(f"featurizer returned {feats.shape} features for rows {lo}..{hi - 1} of the "
                             f"{self.split} store (k={k}); the store belongs to another configuration")
        return write_shard_files(paths.store(self.split), checkpoint, shard, ids, feats, q, self.layout["dtype"])


_WORKER_FEATURIZERS: dict[tuple[str, str], Any] = {}


def _worker_featurizer(cfg: RunConfig, paths: RunPaths, split: str) -> Any:
    """The split's featurizer, built once per worker process and configuration."""
    key = (feature_fingerprint(cfg, split) + str(paths.root), split)
    if key not in _WORKER_FEATURIZERS:
        if len(_WORKER_FEATURIZERS) >= 2:
            _WORKER_FEATURIZERS.clear()
        _WORKER_FEATURIZERS[key] = make_featurizer(cfg, split, paths)
    return _WORKER_FEATURIZERS[key]


def _verify_checkpoint(path: Path, entry: dict[str, Any]) -> None:
    """Refuse a checkpoint file that is missing or changed since the train stage recorded it."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing; rerun the train stage (`tda run CONFIG --from train`)")
    if entry.get("sha256") and checkpoint_digest(path) != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} changed since training (its sha256 differs from {path.parent / 'checkpoints.json'}); "
            "restore it, or retrain into a new run folder; features of another model would be silently wrong"
        )


def _counting(batches, on_rows):
    for ids, batch in batches:
        yield ids, batch
        on_rows(len(ids))
