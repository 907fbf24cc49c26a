"""Shard files of a feature store: pure paths, validated atomic writes (stores/feature_store.py).

A worker may call :func:`write_shard_files`: it touches only one shard's files and returns the
records the driver puts in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tda.errors import DTypeError, DuplicateIdError, NonFiniteFeaturesError, ShapeError, StoreCorruptError, StoreError

from stores._io import save_npy, sha256_file


def shard_path(root: Path, kind: str, checkpoint: int | None, shard: int) -> Path:
    """Path of one shard file: pure function of (kind, checkpoint, shard)."""
    if kind == "ids":
        return root / "ids" / f"shard-{shard:05d}.npy"
    return root / kind / f"ckpt-{checkpoint:03d}" / f"shard-{shard:05d}.npy"


def shard_key(kind: str, checkpoint: int | None, shard: int) -> str:
    return f"{kind}/{'-' if checkpoint is None else checkpoint}/{shard}"


def _check_dtypes(ids: np.ndarray, feats: np.ndarray, q: np.ndarray) -> None:
    if ids.dtype.kind not in "iu":
        raise DTypeError(f"example ids must be integers, got dtype {ids.dtype}; pass the data set's integer "
                         "'id' column (float ids would be silently truncated)")
    for name, arr in (("features", feats), ("loss weights q", q)):
        if arr.dtype.kind != "f":
            raise DTypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}; pass the "
                             "float32 output of the featurizer")


def _check_ids_file(path: Path, ids: np.ndarray, shard: int) -> bool:
    """True when ``path`` already holds exactly ``ids``; raise if it holds other ids."""
    if not path.is_file():
        return False
    try:
        old = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"{path} is not a readable .npy file ({exc}); delete it and re-run") from exc
    if old.shape == ids.shape and np.array_equal(old, ids):
        return True
    raise StoreCorruptError(
        f"example ids of shard {shard} differ from those already stored in {path}; the data order must "
        "be the same for every checkpoint (if the data changed, featurize into a new store folder)"
    )


def write_shard_files(root: str | Path, checkpoint: int, shard: int, ids: np.ndarray,
                      feats: np.ndarray, q: np.ndarray, dtype: str = "float32") -> dict[str, dict]:
    """Write one (checkpoint, shard) atomically; return the records the driver puts in the manifest.

    Safe to call from a worker: touches only this shard's files, never the manifest. Everything is
    validated before the first file is written, and the shard's ids file (shared by every
    checkpoint) is never replaced by different ids, so a bad call leaves the store as it was.
    """
    root = Path(root)
    ids, feats, q = np.asarray(ids), np.asarray(feats), np.asarray(q)
    if feats.ndim != 2 or ids.shape != (feats.shape[0],) or q.shape != (feats.shape[0],):
        raise ShapeError(f"shard arrays disagree: ids {ids.shape}, feats {feats.shape}, q {q.shape}; "
                         "expected ids (rows,), feats (rows, k), q (rows,)")
    _check_dtypes(ids, feats, q)
    ids, feats, q = ids.astype(np.int64), feats.astype(np.float32), q.astype(np.float32)
    if not (np.isfinite(feats).all() and np.isfinite(q).all()):
        raise NonFiniteFeaturesError("refusing to store NaN or infinite features; fix the featurizer input "
                                     "(a diverged checkpoint has NaN weights); nothing was written")
    if len(np.unique(ids)) != len(ids):
        raise DuplicateIdError(f"shard {shard} repeats example ids; every example needs a unique id")
    stored = feats.astype(dtype)
    if dtype == "float16" and not np.isfinite(stored).all():
        raise StoreError("features overflow float16; store them as float32 (featurize.dtype=float32)")
    ids_path = shard_path(root, "ids", None, shard)
    ids_present = _check_ids_file(ids_path, ids, shard)
    records = {}
    for kind, ckpt, arr in (("features", checkpoint, stored), ("q", checkpoint, q), ("ids", None, ids)):
        path = shard_path(root, kind, ckpt, shard)
        if not (kind == "ids" and ids_present):
            save_npy(path, arr)
        records[shard_key(kind, ckpt, shard)] = {
            "file": str(path.relative_to(root)), "rows": int(arr.shape[0]), "shape": list(arr.shape),
            "dtype": str(arr.dtype), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return records


def _refuse_duplicates(shard: int, new: np.ndarray, known_sorted: np.ndarray) -> None:
    """Raise :class:`DuplicateIdError` if ids of a new shard are already in ``known_sorted``."""
    if not len(known_sorted) or not len(new):
        return
    pos = np.clip(np.searchsorted(known_sorted, new), 0, len(known_sorted) - 1)
    dup = new[known_sorted[pos] == new]
    if len(dup):
        raise DuplicateIdError(
            f"shard {shard} repeats example ids already stored in other shards (e.g. {dup[:5].tolist()}); "
            "every example needs a unique id: check the data set's 'id' column"
        )
