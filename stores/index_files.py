"""A run's FAISS index folder: ``index/index.faiss`` and its metadata ``index/index.json``
(written last, with the index's sha256, fingerprint, kind, vector space and recall).

:func:`load` is the one reader of a run's index: the index and score stages, the full ``tda
query`` path, ``tda serve`` and the torch-free path (:mod:`pipelines.query.lean`) all check the
sha256 (:meth:`stores.index.FaissIndex.load`) and the fingerprint, dimension, size and vector
space (:meth:`stores.index.FaissIndex.check`) here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tda.errors import StoreError

from stores._io import json_field
from stores.index import INDEX_FILE, META_FILE, FaissIndex

#: the fix named by a failed check of a run's index
FIX = "rebuild it with `tda run CONFIG --from index`"


def index_path(folder: Path) -> Path:
    """``index.faiss`` in the run's ``index/`` folder."""
    return Path(folder) / INDEX_FILE


def marker_path(folder: Path) -> Path:
    """``index.json`` in the run's ``index/`` folder (written last: a finished index)."""
    return Path(folder) / META_FILE


def marker_field(folder: Path, key: str) -> Any:
    """``key`` of the metadata, or None when it is missing or unreadable."""
    return json_field(marker_path(folder), key)


def exists(folder: Path) -> bool:
    """Whether a finished index is there (its metadata, written last)."""
    return marker_path(folder).is_file()


def save(folder: Path, index: FaissIndex) -> None:
    """Write the index, then its metadata with the index's sha256 (both atomically)."""
    index.save(folder)


def load(folder: Path, *, fingerprint: str, dim: int, n: int, space: str, fix: str = FIX) -> FaissIndex:
    """The index, checked against its sha256 and against the configuration asking
    (``fingerprint``, the scorer fingerprint), the scorer (vector dimension ``dim`` and ``space``)
    and the train store (``n`` examples): :class:`StoreError` when no finished index is there,
    :class:`~tda.errors.StoreCorruptError` when damaged, :class:`~tda.errors.IndexMismatchError`
    when built for something else."""
    if not exists(folder):  # never built, or its stage did not finish
        raise StoreError(f"{folder} holds no finished index; build it with `tda run CONFIG --from index`")
    return FaissIndex.load(folder).check(fingerprint=fingerprint, dim=dim, n=n, space=space, fix=fix)
