"""FAISS inner-product index over a scorer's train-side vectors.

Every scorer's score is ``<T_query(z), T_train(z_i)>`` (see :mod:`tda.scorers.base`), so one
maximum-inner-product index of ``T_train`` serves them all: proponents are the largest inner
products with ``T_query(z)``, opponents the largest with ``-T_query(z)``. Kinds:

- ``flat``: exact (every vector is scored), the default;
- ``pruned``: exact, rows stored by decreasing norm and each query stopped by the Cauchy-Schwarz
  bound (:mod:`stores.pruned`); fast when norms vary a lot (TRAK's ``Q_i``);
- ``ivf``: inverted lists, ``nlist`` cells (default ``4 sqrt(n)``), ``nprobe`` probed per query
  (default :func:`default_nprobe`, about 1/32 of the cells);
- ``hnsw``: a graph (``faiss.IndexHNSWFlat``, inner-product metric) with ``hnsw_m`` links per
  node, ``ef_construction`` candidates while building and ``ef_search`` while searching.

Approximate kinds are checked by :func:`build_index` against brute force on sample queries
(``recall_queries``): recall@k of proponents and opponents is recorded in ``index.json``.
Files: ``index.faiss`` and ``index.json`` (metadata), both written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tda.errors import (ForeignStoreError, IndexMismatchError, QueryError, ShapeError, StoreCorruptError,
                        StoreError)
from tda.core.features import FeatureSource
from tda.core.kernel import TopK
from tda.scorers.base import Scorer

from stores._io import atomic_write, save_json, sha256_file
from stores.pruned import norm_order, pruned_search

INDEX_FILE, META_FILE = "index.faiss", "index.json"
FORMAT = "tda-faiss-index"
KINDS = ("flat", "pruned", "ivf", "hnsw")
#: HNSW defaults: links per node, build-time and search-time candidate lists (benchmarks/index.py)
HNSW_M, EF_CONSTRUCTION, EF_SEARCH = 16, 64, 128
#: recall@k below this on the run's sample queries logs a warning (pipelines/stages/index.py)
RECALL_TARGET = 0.95


def _faiss():
    import faiss

    return faiss


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about ``4 sqrt(n)``."""
    return max(1, int(4 * math.sqrt(max(n, 1))))


def default_nprobe(nlist: int) -> int:
    """IVF cells probed per query: 1/32 of the cells, at least 16 (all of them when fewer)."""
    return min(nlist, max(16, math.ceil(nlist / 32)))


def _inner(index: Any) -> Any:
    """The index under an ``IndexIDMap2`` wrapper (HNSW, flat), downcast so its fields show."""
    faiss = _faiss()
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


class FaissIndex:
    """A FAISS index mapping train-side vectors to example ids, plus its metadata."""

    def __init__(self, index: Any, meta: dict[str, Any]) -> None:
        self.index = index
        self.meta = meta

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "flat"))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, blocks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, kind: str = "flat",
              nlist: int | None = None, nprobe: int | None = None, n_hint: int | None = None,
              meta: dict[str, Any] | None = None, sample: np.ndarray | None = None, *,
              hnsw_m: int | None = None, ef_construction: int | None = None,
              ef_search: int | None = None) -> "FaissIndex":
        """Build from ``(ids (b,), vectors (b, dim))`` blocks.

        For ``ivf`` the coarse quantizer is trained on ``sample`` (rows drawn across the whole
        store, see :func:`build_index`), else on the first blocks (up to 64 * nlist rows), which is
        biased when the store is sorted (by class, by time); ``nlist`` defaults to about ``4 sqrt(n)``
        and ``nprobe`` to :func:`default_nprobe`. For ``hnsw`` see the module docstring.
        """
        faiss = _faiss()
        blocks = iter(blocks)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        info: dict[str, Any] = {"nlist": None, "nprobe": None}
        if kind in ("flat", "pruned"):
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            if kind == "pruned":  # every row first: they are stored by decreasing norm
                every = list(blocks)
                blocks = iter([_by_norm(every)] if every else [])
        elif kind == "ivf":
            nlist = nlist or default_nlist(n_hint or 10_000)
            nprobe = min(nprobe or default_nprobe(nlist), nlist)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            if sample is None:  # gather a training sample from the first blocks
                rows = 0
                for ids, vec in blocks:
                    pending.append((ids, vec))
                    rows += len(ids)
                    if rows >= 64 * nlist:
                        break
                sample = np.concatenate([v for _, v in pending])
            _train_ivf(index, sample, dim, nlist)
            index.nprobe = nprobe
            info = {"nlist": nlist, "nprobe": nprobe}
        elif kind == "hnsw":
            hnsw_m, ef_construction = hnsw_m or HNSW_M, ef_construction or EF_CONSTRUCTION
            ef_search = ef_search or EF_SEARCH
            graph = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction, graph.hnsw.efSearch = ef_construction, ef_search
            index = faiss.IndexIDMap2(graph)
            info = {"nlist": None, "nprobe": None, "hnsw_m": hnsw_m, "ef_construction": ef_construction,
                    "ef_search": ef_search}
        else:
            raise StoreError(f"index kind {kind!r} is unknown; use one of {KINDS}")
        seen = 0
        for ids, vec in [*pending, *blocks]:
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            if vec.ndim != 2 or vec.shape[1] != dim:
                raise ShapeError(f"index vectors must be (b, {dim}), got {vec.shape}")
            index.add_with_ids(vec, np.ascontiguousarray(ids, dtype=np.int64))
            seen += len(ids)
        if seen == 0:
            raise StoreError("no vectors to index: the feature store is empty")
        return cls(index, {**(meta or {}), "format": FORMAT, "kind": kind, "dim": dim, "n": seen, **info})

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> "FaissIndex":
        """Change how hard an approximate index searches (IVF ``nprobe``, HNSW ``ef_search``)."""
        inner = _inner(self.index)
        if nprobe is not None and hasattr(inner, "nprobe"):
            inner.nprobe = self.meta["nprobe"] = min(int(nprobe), int(inner.nlist))
        if ef_search is not None and hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = self.meta["ef_search"] = int(ef_search)
        return self

    def save(self, folder: str | Path) -> None:
        """Write ``index.faiss`` and ``index.json`` into ``folder`` atomically."""
        faiss = _faiss()
        folder = Path(folder)
        atomic_write(folder / INDEX_FILE, lambda tmp: faiss.write_index(self.index, str(tmp)))
        self.meta["sha256"] = sha256_file(folder / INDEX_FILE)  # checked on every load
        save_json(folder / META_FILE, self.meta)

    @classmethod
    def load(cls, folder: str | Path) -> "FaissIndex":
        faiss = _faiss()
        folder = Path(folder)
        meta_path, index_path = folder / META_FILE, folder / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            raise ForeignStoreError(f"{folder} holds no tda index ({META_FILE} and {INDEX_FILE}); build it first")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise StoreCorruptError(f"{meta_path} is not valid JSON; rebuild the index") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ForeignStoreError(f"{meta_path} was not written by tda")
        if meta.get("sha256") and sha256_file(index_path) != meta["sha256"]:
            raise StoreCorruptError(f"{index_path} does not match the sha256 in {meta_path} (damaged, or another "
                                    "run's index); rebuild the index (`tda run CONFIG --from index`)")
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise StoreCorruptError(f"{index_path} cannot be read by FAISS ({exc}); rebuild the index") from exc
        if index.ntotal != meta.get("n") or index.d != meta.get("dim"):
            raise StoreCorruptError(f"{index_path} has {index.ntotal} x {index.d} vectors, metadata says "
                                    f"{meta.get('n')} x {meta.get('dim')}; rebuild the index")
        return cls(index, meta).set_search(meta.get("nprobe"), meta.get("ef_search"))

    def check(self, *, fingerprint: str | None = None, dim: int | None = None, n: int | None = None,
              space: str | None = None, fix: str = "rebuild the index") -> "FaissIndex":
        """Raise :class:`IndexMismatchError` unless the index was built for this configuration
        (``fingerprint``), scorer (vector dimension ``dim``, vector ``space``, see
        :func:`index_space`) and training store (``n`` examples)."""
        problems = []
        if fingerprint is not None and self.meta.get("fingerprint") != fingerprint:
            problems.append(f"it was built for configuration {self.meta.get('fingerprint')!r}, this one is {fingerprint!r}")
        if dim is not None and dim != self.dim:
            problems.append(f"it holds {self.dim}-dimensional vectors, the scorer makes {dim}-dimensional ones")
        if n is not None and n != len(self):
            problems.append(f"it holds {len(self)} training examples, the feature store {n}")
        if space is not None and self.meta.get("space", "plain") != space:
            problems.append(f"it holds {self.meta.get('space', 'plain')!r} vectors, the scorer makes {space!r} ones "
                            "(an index built by an older tda)")
        if problems:
            raise IndexMismatchError(f"the FAISS index does not match: {'; '.join(problems)}; {fix}")
        return self

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Largest inner products: ``(scores (m, k), ids (m, k))``, best first (an approximate
        index that finds fewer than k pads with id -1)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ShapeError(f"queries must be (m, {self.dim}), got {queries.shape}")
        if not 1 <= k <= len(self):
            raise QueryError(f"k must be between 1 and the index size {len(self)}, got {k}")
        if self.kind == "pruned":
            return pruned_search(*self._rows(), queries, k)
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """A ``pruned`` index's stored rows (a view, no copy) and their ids."""
        if getattr(self, "_cached_rows", None) is None:
            faiss = _faiss()
            n, flat = len(self), _inner(self.index)
            rows = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
            self._cached_rows = (rows, faiss.vector_to_array(self.index.id_map).astype(np.int64))
        return self._cached_rows

    def top_k(self, queries: np.ndarray, k: int = 10) -> TopK:
        """Proponents (largest scores) and opponents (most negative) per query."""
        ps, pi = self.search(queries, k)
        os_, oi = self.search(-np.asarray(queries, dtype=np.float32), k)
        return TopK(pi, ps, oi, -os_)

    def recall(self, exact: "ExactTopK") -> dict[str, Any]:
        """Recall@k of this index against brute-force top-k of the same queries (both signs)."""
        e_scores, e_ids = exact.result()
        found_s, found_i = self.search(exact.queries, exact.k)
        m = len(e_ids) // 2
        per = recall_at_k(found_i, found_s, e_ids, e_scores)
        out = {"k": exact.k, "queries": m, "proponents": float(per[:m].mean()), "opponents": float(per[m:].mean())}
        return {**out, "recall": min(out["proponents"], out["opponents"]), "target": RECALL_TARGET}


def _by_norm(blocks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """All blocks as one, rows by decreasing norm."""
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in blocks])
    vec = np.concatenate([np.asarray(v, np.float32) for _, v in blocks])
    order = norm_order(vec)
    return ids[order], vec[order]


def _train_ivf(index: Any, sample: np.ndarray, dim: int, nlist: int) -> None:
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or sample.shape[1] != dim:
        raise ShapeError(f"the IVF training sample must be (rows, {dim}), got {sample.shape}")
    if len(sample) < nlist:
        raise StoreError(f"IVF with nlist={nlist} needs at least {nlist} vectors, got {len(sample)}; lower nlist or "
                         "use kind 'flat'")
    index.train(sample)


class ExactTopK:
    """Brute-force top-k of ``queries`` and of ``-queries`` (proponents, opponents), streamed
    over ``(ids, vectors)`` blocks: the reference an approximate index is checked against."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or len(q) == 0:
            raise ShapeError(f"recall queries must be (m >= 1, D), got {q.shape}")
        self.queries = np.ascontiguousarray(np.concatenate([q, -q]))  # (2m, D)
        self.k = int(k)
        self.scores = np.empty((len(self.queries), 0), np.float32)
        self.ids = np.empty((len(self.queries), 0), np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        s = self.queries @ np.asarray(vectors, dtype=np.float32).T  # (2m, b)
        all_s = np.concatenate([self.scores, s], axis=1)
        all_i = np.concatenate([self.ids, np.broadcast_to(np.asarray(ids, np.int64), s.shape)], axis=1)
        if all_s.shape[1] > self.k:
            keep = np.argpartition(-all_s, self.k - 1, axis=1)[:, :self.k]
            all_s, all_i = np.take_along_axis(all_s, keep, 1), np.take_along_axis(all_i, keep, 1)
        self.scores, self.ids = all_s, all_i

    def watch(self, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pass blocks through, scoring each on the way (one pass builds the index and the reference)."""
        for ids, vec in blocks:
            self.update(ids, vec)
            yield ids, vec

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` (2m, k), best first: rows ``:m`` proponents, ``m:`` negated opponents."""
        if self.scores.shape[1] < self.k:
            raise QueryError(f"recall@{self.k} needs at least {self.k} training examples, got {self.scores.shape[1]}")
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.ids, order, 1)


def recall_at_k(found_ids: np.ndarray, found_scores: np.ndarray, exact_ids: np.ndarray,
                exact_scores: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
    """Per query, the share of the exact top-k the index found. A found example outside the exact
    list counts when its score ties the exact k-th (within ``rtol`` of the query's largest
    |score|), so ties broken differently are not misses; padding ids (-1) never count."""
    k = exact_ids.shape[1]
    out = np.empty(len(exact_ids))
    for r, (fi, fs, ei, es) in enumerate(zip(found_ids, found_scores, exact_ids, exact_scores)):
        valid = fi >= 0
        tol = rtol * max(float(np.abs(es).max()), 1e-30)
        hit = np.isin(fi, ei) | (fs >= es[-1] - tol)
        out[r] = min(int((hit & valid).sum()), k) / k
    return out


def index_space(scorer: Scorer) -> str:
    """What the scorer's vectors are (``"plain"`` unless it says otherwise, e.g. TRAK's whitened
    vectors): an index of one space cannot answer queries of another."""
    return str(getattr(scorer, "index_space", "plain"))


def build_index(train: FeatureSource, scorer: Scorer, kind: str = "flat", nlist: int | None = None,
                nprobe: int | None = None, block_rows: int = 4096, meta: dict[str, Any] | None = None, *,
                hnsw_m: int | None = None, ef_construction: int | None = None, ef_search: int | None = None,
                recall_queries: np.ndarray | None = None, recall_k: int = 10) -> FaissIndex:
    """Index ``scorer.transform_train`` of every block of ``train``.

    With ``recall_queries`` ((m, D) ``transform_query`` vectors) and an approximate kind, the
    brute-force top-``recall_k`` of those queries is computed in the same pass and the index's
    recall against it is recorded in ``meta["recall"]`` (see :meth:`FaissIndex.recall`).
    """
    blocks = ((b.ids, scorer.transform_train(b)) for b in train.iter_blocks(block_rows))
    first = next(blocks, None)
    if first is None:
        raise StoreError("no training features to index")
    dim = first[1].shape[1]

    def chained():
        yield first
        yield from blocks

    info = {"scorer": scorer.name, "hyperparameters": scorer.hyperparameters(), "space": index_space(scorer),
            **(meta or {})}
    sample = _ivf_sample(train, scorer, first, nlist, block_rows) if kind == "ivf" else None
    exact = None
    if recall_queries is not None and kind not in ("flat", "pruned"):
        exact = ExactTopK(recall_queries, min(recall_k, len(train)))
    stream = exact.watch(chained()) if exact is not None else chained()
    index = FaissIndex.build(stream, dim, kind, nlist, nprobe, n_hint=len(train), meta=info, sample=sample,
                             hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
    if exact is not None:
        index.meta["recall"] = index.recall(exact)
    elif recall_queries is not None:  # flat, pruned: exact by construction
        index.meta["recall"] = exact_recall(min(recall_k, len(train)), len(recall_queries))
    return index


def exact_recall(k: int, queries: int = 0) -> dict[str, Any]:
    """The recall record of an exact (flat) index: 1, nothing measured."""
    return {"k": k, "queries": queries, "proponents": 1.0, "opponents": 1.0, "recall": 1.0, "target": RECALL_TARGET,
            "exact": True}


def _ivf_sample(train: FeatureSource, scorer: Scorer, first: tuple[np.ndarray, np.ndarray], nlist: int | None,
                block_rows: int) -> np.ndarray:
    """Rows drawn from the whole store to train the IVF quantizer on, not its first rows."""
    n = len(train)
    rate = min(1.0, 64 * (nlist or default_nlist(n)) / max(n, 1))
    rng = np.random.default_rng(0)
    parts = [first[1][rng.random(len(first[0])) < rate]]
    rest = train.iter_blocks(block_rows)
    next(rest)  # the first block is transformed already
    for b in rest:  # transform the sampled rows only
        keep = rng.random(len(b)) < rate
        if keep.any():
            parts.append(scorer.transform_train(b.select(keep)))
    return np.concatenate(parts)
