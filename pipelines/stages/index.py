"""The index stage: fit the scorer on the train store, save its state, build the FAISS index.

Both are keyed by the scorer fingerprint (training side of the feature sections, the scorer's
settings, the index settings): a rerun with the same settings loads them, another refits. An
approximate index (``index.kind: ivf`` / ``hnsw``; ``flat`` and ``pruned`` are exact) is checked against brute force on up to
``index.recall_queries`` of the run's queries, in the same pass over the store that builds it:
recall@k (k = ``score.topk``) of proponents and opponents goes into ``index.json`` (``recall``),
and a warning naming the fix is logged below :data:`stores.index.RECALL_TARGET`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stores import FeatureStore, FaissIndex, build_index, index_files, scorer_state, scores_files
from stores.index import RECALL_TARGET, exact_recall, index_space
from tda.errors import IndexMismatchError, InputChangedError, NonFiniteFeaturesError, StoreError, TDAError

from pipelines.layout import RunPaths, fingerprint_version
from pipelines.spec.schema import RunConfig
from pipelines.spec.fingerprints import scorer_fingerprint
from pipelines.methods.bound import bind

logger = logging.getLogger(__name__)


def scorer_for(cfg: RunConfig, paths: RunPaths | None = None) -> Any:
    """The run's (unfitted) scorer, from the scorer registry (a new one: fitting changes it)."""
    return bind(cfg, paths).scorer()


def stage_index(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> FaissIndex:
    """Fit the scorer on the train store, save its state, build and save the FAISS index."""
    fp, scorer = scorer_fingerprint(cfg, fingerprint_version(paths)), scorer_for(cfg, paths)  # built once: checked, then fitted
    markers = (scorer_state.marker_path(paths.scorer), index_files.marker_path(paths.index))
    space = index_files.marker_field(paths.index, "space") or "plain"  # an older tda indexed TRAK unwhitened
    if scorer_state.fitted_for(paths.scorer, fp) and index_files.marker_field(paths.index, "fingerprint") == fp \
            and scorer_state.intact(paths.scorer) and space == index_space(scorer):
        try:
            return FaissIndex.load(paths.index)  # checked against its sha256
        except StoreError as exc:
            logger.warning("rebuilding the index: %s", exc)  # derived data: recomputed, never trusted
    train = FeatureStore.open(paths.store("train"))
    view = _View(train, desc="index: fit scorer" if progress else None, norms={})
    scorer = scorer.fit(view, progress=progress)
    check_feature_scale(view.norms)
    for marker in (scores_files.marker_path(paths.scores), *markers):  # before any file changes: a kill from here on
        marker.unlink(missing_ok=True)                      # leaves nothing that looks valid
    scorer_state.save(paths.scorer, scorer.state_dict(), scorer=scorer.name, fingerprint=fp,
                      hyperparameters=scorer.hyperparameters())
    ic = cfg.index
    exact = ic.kind in ("flat", "pruned")
    queries = None if exact else _recall_queries(cfg, paths, scorer)
    k = min(cfg.score.topk, len(train))
    index = build_index(_View(train, desc=f"index: build {ic.kind}" if progress else None), scorer, ic.kind,
                        ic.nlist, ic.nprobe, meta={"fingerprint": fp}, hnsw_m=ic.hnsw_m,
                        ef_construction=ic.ef_construction, ef_search=ic.ef_search, recall_queries=queries,
                        recall_k=k)
    if exact:
        index.meta["recall"] = exact_recall(k)
    _warn_recall(index)
    index_files.save(paths.index, index)
    return index


def _recall_queries(cfg: RunConfig, paths: RunPaths, scorer: Any) -> np.ndarray | None:
    """Query vectors of up to ``index.recall_queries`` of the run's queries, spread evenly over the
    query store (None: no check, or no query store yet)."""
    want = cfg.index.recall_queries
    if want == 0 or not paths.store("query").is_dir():
        return None
    try:
        query = FeatureStore.open(paths.store("query"))
    except StoreError as exc:
        logger.warning("index: no recall check (%s)", exc)
        return None
    pick = np.unique(np.linspace(0, len(query) - 1, min(want, len(query))).round().astype(np.int64))
    parts, start = [], 0
    for blk in query.iter_blocks():
        rows = pick[(pick >= start) & (pick < start + len(blk))] - start
        if len(rows):
            parts.append(scorer.transform_query(blk.select(rows)))
        start += len(blk)
    return np.concatenate(parts) if parts else None


def _warn_recall(index: FaissIndex) -> None:
    """Log a warning naming the fix when the approximate index misses the exact top-k."""
    rec = index.meta.get("recall")
    if not rec or rec.get("exact") or rec["recall"] >= RECALL_TARGET:
        return
    meta = index.meta
    if index.kind == "ivf":
        fix = (f"raise index.nprobe (now {meta['nprobe']} of nlist {meta['nlist']} cells; recall rises with the "
               "share probed)")
    else:
        fix = (f"raise index.ef_search (now {meta['ef_search']}), or index.hnsw_m (now {meta['hnsw_m']}) and "
               f"index.ef_construction (now {meta['ef_construction']})")
    logger.warning("index: recall@%d of the %s index is %.3f (proponents %.3f, opponents %.3f) on %d of the run's "
                   "queries, below %.2f: %s, or use index.kind: flat (exact)", rec["k"], index.kind, rec["recall"],
                   rec["proponents"], rec["opponents"], rec["queries"], RECALL_TARGET, fix)


def check_inputs_unchanged(cfg: RunConfig, paths: RunPaths) -> None:
    """:class:`InputChangedError` naming the inputs whose content changed since ``tda run`` made
    the run (recorded in run.json): its features are stale, so the fix is a full rerun."""
    from pipelines.run import describe_change, input_record
    from pipelines.run_folder import read_run_file

    try:
        old = read_run_file(paths)
    except TDAError:
        return
    new = input_record(cfg)
    changed = {k for k, v in new.items() if (old.get("inputs") or {}).get(k, {}).get("sha256") != v["sha256"]}
    changed -= {"data.query_path"}  # queries are not the training side
    if changed:
        what = describe_change(old, {"inputs": new, "config": old.get("config", {})})
        raise InputChangedError(f"{paths.root}: {what} since the run was made; its features are stale: rerun `tda run "
                                f"CONFIG --out {paths.root} --overwrite` (or put the original files back)")


def load_scorer(cfg: RunConfig, paths: RunPaths):
    """The fitted scorer saved by the index stage (no pickle), read by :func:`stores.scorer_state.load`
    once per command (:meth:`pipelines.methods.bound.BoundRun.fitted_scorer`: the score stage and the
    report of one ``tda run`` share it)."""
    run = bind(cfg, paths)

    def read() -> Any:
        try:
            state = scorer_state.load(paths.scorer, scorer_fingerprint(cfg, fingerprint_version(paths)))
        except IndexMismatchError:  # fitted for another configuration, or a fit that never finished
            check_inputs_unchanged(cfg, paths)  # a changed checkpoint or data file: refitting would not do
            raise
        return run.scorer().load_state_dict(state)
    return run.fitted_scorer(read)


def load_index(cfg: RunConfig, paths: RunPaths, dim: int, n_train: int, scorer: Any = None) -> FaissIndex:
    """The run's FAISS index, checked against the configuration, the scorer's dimension and vector
    space and the store (:func:`stores.index_files.load`); ``scorer``: the run's, when the caller
    has it (else it is built to learn its space)."""
    space = index_space(scorer if scorer is not None else scorer_for(cfg, paths))
    return index_files.load(paths.index, fingerprint=scorer_fingerprint(cfg, fingerprint_version(paths)), dim=dim, n=n_train, space=space)


#: a training row whose features are this many times the median row's is broken input, not signal
FEATURE_SCALE_LIMIT = 1e6


def check_feature_scale(norms: dict[int, float]) -> None:
    """:class:`NonFiniteFeaturesError` naming the training rows whose features are not finite or
    exceed :data:`FEATURE_SCALE_LIMIT` times the median row's: such a row (a pixel of 1e30, say)
    would dominate the kernel and shrink every score towards zero."""
    if not norms:
        return
    ids, values = np.fromiter(norms.keys(), np.int64, len(norms)), np.fromiter(norms.values(), np.float64, len(norms))
    finite = np.isfinite(values)
    median = float(np.median(values[finite])) if finite.any() else 0.0
    bad = ~finite | (values > FEATURE_SCALE_LIMIT * max(median, 1e-30))
    if bad.any():
        worst = ids[bad][np.argsort(-np.nan_to_num(values[bad], nan=np.inf))][:10].tolist()
        raise NonFiniteFeaturesError(
            f"{int(bad.sum())} training row(s) have gradient features that are not finite or over "
            f"{FEATURE_SCALE_LIMIT:.0e} times the median row's (ids {worst}; largest norm {np.nanmax(values):.3g} "
            f"against a median of {median:.3g}): their inputs are likely broken (an extreme or unscaled value); fix or "
            "drop those rows in the data, then rerun with --overwrite (or into another --out)")


class _View:
    """A feature store seen from row ``start`` on (resuming a scoring pass), optionally with a
    progress bar (rows/s and ETA) over its blocks."""

    def __init__(self, source: FeatureStore, start: int = 0, desc: str | None = None,
                 norms: dict[int, float] | None = None) -> None:
        self.source, self.start, self.desc = source, start, desc
        self.checkpoints = source.checkpoints
        self.norms = norms  # id -> largest feature norm over checkpoints, gathered as blocks pass (None: not)

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
                    if self.norms is not None:
                        norms = np.sqrt(np.square(blk.feats, dtype=np.float64).sum(axis=2)).max(axis=0)  # (b,)
                        self.norms.update(zip(np.asarray(blk.ids).tolist(), norms.tolist()))
                    yield blk
                    bar.update(len(blk))
