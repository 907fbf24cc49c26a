"""The staged job: train -> featurize -> index -> score (-> report).

Each stage reads its inputs from the run folder, writes outputs atomically and records
completion, so a rerun skips finished work: training per model, featurization per
(checkpoint, shard), the index and scores per configuration fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stores import FeatureStore, FaissIndex, build_index
from stores._io import atomic_write, save_json, save_npz, sha256_file
from stores.feature_store import write_shard_files
from tda.data import iter_batches
from tda.errors import CheckpointError, IndexMismatchError, StoreError
from tda.features import FeatureBlock, concat_blocks
from tda.kernel import iter_score_blocks

from .executors import make_executor
from .config import SCORE_SECTIONS, RunConfig, scorer_fingerprint, section_fingerprint
from .families import family_for
from .run import RunPaths, collate_for, datasets_for, feature_fingerprint, load_checkpoint_list, make_featurizer

logger = logging.getLogger(__name__)
STAGES = ("train", "featurize", "index", "score")


def stage_train(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> list[dict[str, Any]]:
    """Train ``cfg.train.models`` models with the family's recipe, saving a checkpoint at each of
    its checkpoint epochs; skip finished models."""
    family = family_for(cfg)
    epochs = family.checkpoint_epochs(cfg)
    done = {(c["model"], c["epoch"]): c for c in _read_list(paths)}
    bar = tqdm(range(cfg.train.models), desc="train", unit="model", disable=not progress)
    for m in bar:
        if (all((m, e) in done and paths.checkpoint(m, e).is_file() for e in epochs)
                and all(p.is_file() for p in family.train_outputs(cfg, paths, m))):
            continue

        def save(epoch: int, model: torch.nn.Module, m: int = m, **info: Any) -> None:
            path = paths.checkpoint(m, epoch)
            atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
            done[(m, epoch)] = {"model": m, "epoch": epoch, "file": path.name, "sha256": sha256_file(path), **info}

        summary = family.train(cfg, paths, m, save)
        done[(m, epochs[-1])].update(summary)
        bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in summary.items()})
        _write_list(paths, done)
    return _selected(cfg, paths)


def _read_list(paths: RunPaths) -> list[dict[str, Any]]:
    if not paths.checkpoint_list.is_file():
        return []
    return json.loads(paths.checkpoint_list.read_text())["all"]


def _write_list(paths: RunPaths, done: dict) -> None:
    entries = [done[k] for k in sorted(done)]
    save_json(paths.checkpoint_list, {"all": entries, "checkpoints": []})


def _selected(cfg: RunConfig, paths: RunPaths) -> list[dict[str, Any]]:
    """The attributed checkpoints, numbered 0..C-1, recorded in checkpoints.json."""
    entries = _read_list(paths)
    last = cfg.train.epochs - 1
    chosen = [e for e in entries if cfg.train.checkpoints == "all" or e["epoch"] == last]
    chosen = [{**e, "id": i} for i, e in enumerate(chosen)]
    listing = {"all": entries, "checkpoints": chosen}
    if _json_field(paths.checkpoint_list, "checkpoints") != chosen or _json_field(paths.checkpoint_list, "all") != entries:
        save_json(paths.checkpoint_list, listing)  # rewritten only when it changes: a rerun touches nothing
    return chosen


def open_store(cfg: RunConfig, paths: RunPaths, split: str, n: int, spec: dict, k: int | None = None) -> FeatureStore:
    """The split's store; ``k`` is the feature width (default ``featurize.k``)."""
    f = cfg.featurize
    ckpts = load_checkpoint_list(paths)
    fp = feature_fingerprint(cfg, split) + f"-{split}"
    if split == "query" and _json_field(paths.store(split) / "manifest.json", "fingerprint") not in (None, fp):
        logger.info("the queries changed: replacing %s", paths.store(split))  # derived data; we hold the run lock
        shutil.rmtree(paths.store(split))
    return FeatureStore.create(paths.store(split), n=n, k=k or f.k, checkpoints=[c["id"] for c in ckpts],
                               shard_size=f.shard_size, fingerprint=fp, spec={**spec, "split": split},
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
    stores = {}
    verified: set[int] = set()
    local = getattr(executor, "name", "") == "local"
    for split in ("train", "query"):
        featurizer = make_featurizer(cfg, split, paths)  # the family may featurize splits differently
        store = open_store(cfg, paths, split, len(data[split]), featurizer.spec(),
                           getattr(featurizer, "feature_dim", None))
        store.remove_orphans()  # temporary files of a writer that was killed (we hold the run lock)
        stores[split] = store
        pending = store.pending()
        for c in sorted({c for c, _ in pending} - verified):
            _verify_checkpoint(paths.checkpoints / entries[c]["file"], entries[c])
            verified.add(c)
        store.drop_unrecorded_ids({s for _, s in pending})  # written by a job whose record never came
        rows = {s: hi - lo for s in {s for _, s in pending} for lo, hi in [store.shard_rows(s)]}
        todo = sum(rows[s] for _, s in pending)
        stats[split] = {"jobs": len(pending), "rows": todo, "examples": len(store), "checkpoints": len(store.checkpoints)}
        bar = tqdm(total=todo, desc=f"featurize {split}", unit="ex", disable=not progress or not pending)
        layout = {key: store.manifest[key] for key in ("n", "shard_size", "k", "dtype")}
        job = FeaturizeJob(cfg.to_dict(), str(paths.root), split, layout, {c: entries[c]["file"] for c in entries})
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
            from .config import parse_config

            torch.set_num_threads(1)  # one job per worker thread; no oversubscription
            cfg = parse_config(self.config)
            self._bound = (cfg, _worker_featurizer(cfg, paths, self.split), datasets_for(cfg, paths)[self.split], None)
        cfg, featurizer, dataset, on_rows = self._bound
        n, size, k = self.layout["n"], self.layout["shard_size"], self.layout["k"]
        lo, hi = shard * size, min(n, (shard + 1) * size)
        batches = iter_batches(dataset, collate_for(cfg), cfg.featurize.batch_size, lo, hi)
        if on_rows is not None:
            batches = _counting(batches, on_rows)
        parts = list(featurizer.featurize(paths.checkpoints / self.checkpoint_files[checkpoint], checkpoint, batches))
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
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing; rerun the train stage (`tda run CONFIG --from train`)")
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} changed since training (its sha256 differs from {path.parent / 'checkpoints.json'}); "
            "restore it, or retrain into a new run folder; features of another model would be silently wrong"
        )


def _counting(batches, on_rows):
    for ids, batch in batches:
        yield ids, batch
        on_rows(len(ids))


def scorer_for(cfg: RunConfig, paths: RunPaths | None = None):
    return family_for(cfg).scorer(cfg, paths)


def stage_index(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> FaissIndex:
    """Fit the scorer on the train store, save its state, build and save the FAISS index."""
    fp = scorer_fingerprint(cfg)
    if _json_field(paths.index / "index.json", "fingerprint") == fp:
        return FaissIndex.load(paths.index)
    train = FeatureStore.open(paths.store("train"))
    scorer = scorer_for(cfg, paths).fit(_View(train, desc="index: fit scorer" if progress else None),
                                        progress=progress)
    state = scorer.state_dict()
    save_npz(paths.scorer / "state.npz", **state)
    save_json(paths.scorer / "scorer.json", {"scorer": scorer.name, "fingerprint": fp,
                                             "hyperparameters": scorer.hyperparameters()})
    index = build_index(_View(train, desc=f"index: build {cfg.index.kind}" if progress else None), scorer, cfg.index.kind,
                        cfg.index.nlist, cfg.index.nprobe, meta={"fingerprint": fp})
    index.save(paths.index)
    return index


def _json_field(path: Path, key: str) -> Any:
    """``key`` of a JSON file, or None when the file is missing or unreadable (then the work is redone)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def load_scorer(cfg: RunConfig, paths: RunPaths):
    """The fitted scorer saved by the index stage (no pickle)."""
    fp = scorer_fingerprint(cfg)
    state_path = paths.scorer / "state.npz"
    if not state_path.is_file():
        raise StoreError(f"{state_path} is missing; run the index stage first (`tda run CONFIG --from index`)")
    if _json_field(paths.scorer / "scorer.json", "fingerprint") not in (fp, None):
        raise IndexMismatchError(
            f"the scorer in {paths.scorer} was fitted for another score/index configuration; refit it with "
            "`tda run CONFIG --from index`"
        )
    with np.load(state_path, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    return scorer_for(cfg, paths).load_state_dict(state)


def load_index(cfg: RunConfig, paths: RunPaths, dim: int, n_train: int) -> FaissIndex:
    """The run's FAISS index, checked against the configuration, the scorer's dimension and the store."""
    index = FaissIndex.load(paths.index)
    return index.check(fingerprint=scorer_fingerprint(cfg), dim=dim, n=n_train,
                       fix="rebuild it with `tda run CONFIG --from index`")


class _View:
    """A feature store seen from row ``start`` on (resuming a scoring pass), optionally with a
    progress bar (rows/s and ETA) over its blocks."""

    def __init__(self, source: FeatureStore, start: int = 0, desc: str | None = None) -> None:
        self.source, self.start, self.desc = source, start, desc
        self.checkpoints = source.checkpoints

    def __len__(self) -> int:
        return len(self.source) - self.start

    @property
    def k(self) -> int:
        return self.source.k

    def iter_blocks(self, block_rows: int = 4096):
        col = 0
        with tqdm(total=len(self), desc=self.desc, unit="ex", disable=self.desc is None) as bar:
            for blk in self.source.iter_blocks(block_rows):
                col += len(blk)
                if col > self.start:
                    if col - len(blk) < self.start:  # cannot happen with the same block_rows and shard_size
                        raise StoreError("scoring progress does not fall on a block boundary; delete scores/ and rerun")
                    yield blk
                    bar.update(len(blk))


def _write_scores(cfg: RunConfig, paths: RunPaths, fp: str, qv: np.ndarray, scorer, train: FeatureStore,
                  progress: bool) -> Path:
    """Fill ``scores.partial.npy`` (a memmap) block by block, recording progress after each block.

    Memory holds the query vectors and one (n_query, block_rows) block, never the whole matrix;
    an interrupted pass resumes at the first block not recorded in ``scores.progress.json``.
    """
    partial, prog_path = paths.scores / "scores.partial.npy", paths.scores / "scores.progress.json"
    shape = (int(qv.shape[0]), len(train))
    key = {"fingerprint": fp, "shape": list(shape), "block_rows": cfg.score.block_rows}
    done = 0
    try:
        prog = json.loads(prog_path.read_text())
        if {k: prog.get(k) for k in key} == key and partial.is_file():
            out = np.lib.format.open_memmap(partial, mode="r+")
            done = int(prog["cols"]) if out.shape == shape and out.dtype == np.float32 else 0
            del out
    except (OSError, ValueError, KeyError, TypeError):
        done = 0
    if done == 0:
        prog_path.unlink(missing_ok=True)
        paths.scores.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
    elif done < shape[1]:
        logger.info("resuming scores at training column %d of %d", done, shape[1])
    out = np.lib.format.open_memmap(partial, mode="r+")
    bar = tqdm(total=shape[1], initial=done, desc="score", unit="train ex", disable=not progress)
    col = done
    for ids, block in iter_score_blocks(qv, scorer, _View(train, done), cfg.score.block_rows):
        out[:, col: col + len(ids)] = block  # (n_query, b)
        col += len(ids)
        out.flush()
        save_json(prog_path, {**key, "cols": col})
        bar.update(len(ids))
    bar.close()
    del out
    if col != shape[1]:
        raise StoreError(f"scored {col} of {shape[1]} training examples; delete {paths.scores} and rerun")
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    final = paths.scores / "scores.npy"
    os.replace(partial, final)
    prog_path.unlink(missing_ok=True)
    return final


def stage_score(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, Path]:
    """Dense scores (written block by block into a memmap, resumable; skipped with
    ``score.dense: false``) and top-k per query from the index."""
    fp = section_fingerprint(cfg, *SCORE_SECTIONS)
    outputs = {"topk": paths.scores / "topk.npz"}
    if cfg.score.dense:
        outputs["scores"] = paths.scores / "scores.npy"
    if _json_field(paths.scores / "scores.json", "fingerprint") == fp and all(p.is_file() for p in outputs.values()):
        return outputs
    train, query = FeatureStore.open(paths.store("train")), FeatureStore.open(paths.store("query"))
    scorer = load_scorer(cfg, paths)
    qblk: FeatureBlock = concat_blocks(list(query.iter_blocks()))  # every shard (iter_blocks yields per shard)
    qv = scorer.transform_query(qblk)  # (n_query, D)
    index = load_index(cfg, paths, dim=qv.shape[1], n_train=len(train))
    if cfg.score.dense:
        _write_scores(cfg, paths, fp, qv, scorer, train, progress)
    else:
        (paths.scores / "scores.npy").unlink(missing_ok=True)  # of an earlier configuration: not these scores
    top = index.top_k(qv, cfg.score.topk)
    save_npz(outputs["topk"], query_ids=qblk.ids, train_ids=train.ids(), proponent_ids=top.proponent_ids,
             proponent_scores=top.proponent_scores, opponent_ids=top.opponent_ids,
             opponent_scores=top.opponent_scores)
    save_json(paths.scores / "scores.json", {"fingerprint": fp, "n_query": len(query), "n_train": len(train),
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return outputs
