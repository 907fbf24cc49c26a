"""FAISS inner-product index over a scorer's train-side vectors.

Every scorer's score is ``<T_query(z), T_train(z_i)>`` (see :mod:`tda.scorers.base`), so one
maximum-inner-product index of ``T_train`` serves them all: proponents are the largest inner
products with ``T_query(z)``, opponents the largest with ``-T_query(z)``. ``kind="flat"`` is
exact; ``kind="ivf"`` (inverted lists, ``nlist`` cells, ``nprobe`` probed) is approximate and
meant for large stores. Files: ``index.faiss`` and ``index.json`` (metadata), both written
atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tda.errors import (ForeignStoreError, IndexMismatchError, QueryError, ShapeError, StoreCorruptError,
                        StoreError)
from tda.features import FeatureSource
from tda.kernel import TopK
from tda.scorers.base import Scorer

from ._io import atomic_write, save_json, sha256_file

INDEX_FILE, META_FILE = "index.faiss", "index.json"
FORMAT = "tda-faiss-index"


def _faiss():
    import faiss

    return faiss


class FaissIndex:
    """A FAISS index mapping train-side vectors to example ids, plus its metadata."""

    def __init__(self, index: Any, meta: dict[str, Any]) -> None:
        self.index = index
        self.meta = meta

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, blocks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, kind: str = "flat",
              nlist: int | None = None, nprobe: int = 16, n_hint: int | None = None,
              meta: dict[str, Any] | None = None, sample: np.ndarray | None = None) -> "FaissIndex":
        """Build from ``(ids (b,), vectors (b, dim))`` blocks.

        For ``ivf`` the coarse quantizer is trained on ``sample`` (rows drawn across the whole
        store, see :func:`build_index`), else on the first blocks (up to 64 * nlist rows), which is
        biased when the store is sorted (by class, by time); ``nlist`` defaults to about ``4 sqrt(n)``.
        """
        faiss = _faiss()
        blocks = iter(blocks)
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            pending: list[tuple[np.ndarray, np.ndarray]] = []
        elif kind == "ivf":
            nlist = nlist or max(1, int(4 * math.sqrt(n_hint or 10_000)))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            pending = []
            if sample is None:
                rows = 0
                for ids, vec in blocks:  # gather a training sample from the first blocks
                    pending.append((ids, vec))
                    rows += len(ids)
                    if rows >= 64 * nlist:
                        break
                sample = np.concatenate([v for _, v in pending])
            sample = np.ascontiguousarray(sample, dtype=np.float32)
            if sample.ndim != 2 or sample.shape[1] != dim:
                raise ShapeError(f"the IVF training sample must be (rows, {dim}), got {sample.shape}")
            if len(sample) < nlist:
                raise StoreError(f"IVF with nlist={nlist} needs at least {nlist} vectors, got {len(sample)}; lower nlist or use kind 'flat'")
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
        else:
            raise StoreError(f"index kind {kind!r} is unknown; use 'flat' or 'ivf'")
        seen = 0
        for ids, vec in [*pending, *blocks]:
            vec = np.ascontiguousarray(vec, dtype=np.float32)
            if vec.ndim != 2 or vec.shape[1] != dim:
                raise ShapeError(f"index vectors must be (b, {dim}), got {vec.shape}")
            index.add_with_ids(vec, np.ascontiguousarray(ids, dtype=np.int64))
            seen += len(ids)
        if seen == 0:
            raise StoreError("no vectors to index: the feature store is empty")
        info = {"format": FORMAT, "kind": kind, "dim": dim, "n": seen, "nlist": nlist, "nprobe": nprobe}
        return cls(index, {**(meta or {}), **info})

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
        if "nprobe" in meta and hasattr(index, "nprobe"):
            index.nprobe = meta["nprobe"]
        return cls(index, meta)

    def check(self, *, fingerprint: str | None = None, dim: int | None = None, n: int | None = None,
              fix: str = "rebuild the index") -> "FaissIndex":
        """Raise :class:`IndexMismatchError` unless the index was built for this configuration
        (``fingerprint``), scorer (vector dimension ``dim``) and training store (``n`` examples)."""
        problems = []
        if fingerprint is not None and self.meta.get("fingerprint") != fingerprint:
            problems.append(f"it was built for configuration {self.meta.get('fingerprint')!r}, this one is {fingerprint!r}")
        if dim is not None and dim != self.dim:
            problems.append(f"it holds {self.dim}-dimensional vectors, the scorer makes {dim}-dimensional ones")
        if n is not None and n != len(self):
            problems.append(f"it holds {len(self)} training examples, the feature store {n}")
        if problems:
            raise IndexMismatchError(f"the FAISS index does not match: {'; '.join(problems)}; {fix}")
        return self

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Largest inner products: ``(scores (m, k), ids (m, k))``, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ShapeError(f"queries must be (m, {self.dim}), got {queries.shape}")
        if not 1 <= k <= len(self):
            raise QueryError(f"k must be between 1 and the index size {len(self)}, got {k}")
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def top_k(self, queries: np.ndarray, k: int = 10) -> TopK:
        """Proponents (largest scores) and opponents (most negative) per query."""
        ps, pi = self.search(queries, k)
        os_, oi = self.search(-np.asarray(queries, dtype=np.float32), k)
        return TopK(pi, ps, oi, -os_)


def build_index(train: FeatureSource, scorer: Scorer, kind: str = "flat", nlist: int | None = None,
                nprobe: int = 16, block_rows: int = 4096, meta: dict[str, Any] | None = None) -> FaissIndex:
    """Index ``scorer.transform_train`` of every block of ``train``."""
    blocks = ((b.ids, scorer.transform_train(b)) for b in train.iter_blocks(block_rows))
    first = next(blocks, None)
    if first is None:
        raise StoreError("no training features to index")
    dim = first[1].shape[1]

    def chained():
        yield first
        yield from blocks

    info = {"scorer": scorer.name, "hyperparameters": scorer.hyperparameters(), **(meta or {})}
    sample = None
    if kind == "ivf":  # train the quantizer on rows drawn from the whole store, not its first rows
        n = len(train)
        rate = min(1.0, 64 * (nlist or max(1, int(4 * math.sqrt(n)))) / max(n, 1))
        rng = np.random.default_rng(0)
        parts = [first[1][rng.random(len(first[0])) < rate]]
        rest = train.iter_blocks(block_rows)
        next(rest)  # the first block is transformed already
        for b in rest:  # transform the sampled rows only
            keep = rng.random(len(b)) < rate
            if keep.any():
                parts.append(scorer.transform_train(b.select(keep)))
        sample = np.concatenate(parts)
    return FaissIndex.build(chained(), dim, kind, nlist, nprobe, n_hint=len(train), meta=info, sample=sample)
