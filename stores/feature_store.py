"""Append-only, chunked feature store with a JSON manifest (ARCHITECTURE.md seam 3).

Layout of a store folder::

    manifest.json                       what the store holds, which shards are complete
    ids/shard-00000.npy                 (rows,) int64 example ids
    features/ckpt-000/shard-00000.npy   (rows, k) float32 or float16 projected gradients
    q/ckpt-000/shard-00000.npy          (rows,) float32 loss weights Q

Paths are pure functions of (kind, checkpoint, shard). Shard files are written to a temporary
name and renamed into place by whoever computes them (a worker may); a shard counts as done only
once the manifest records it, and only the driver writes the manifest. Arrays are plain ``.npy``
read with ``allow_pickle=False`` (memory-mapped), so nothing in a store is ever unpickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tda.errors import (FingerprintMismatchError, ForeignStoreError, ShapeError, StoreCorruptError,
                        StoreError)
from tda.features import FeatureBlock

from ._io import save_json, save_npy, sha256_file

FORMAT = "tda-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")


def shard_path(root: Path, kind: str, checkpoint: int | None, shard: int) -> Path:
    """Path of one shard file: pure function of (kind, checkpoint, shard)."""
    if kind == "ids":
        return root / "ids" / f"shard-{shard:05d}.npy"
    return root / kind / f"ckpt-{checkpoint:03d}" / f"shard-{shard:05d}.npy"


def shard_key(kind: str, checkpoint: int | None, shard: int) -> str:
    return f"{kind}/{'-' if checkpoint is None else checkpoint}/{shard}"


def write_shard_files(root: str | Path, checkpoint: int, shard: int, ids: np.ndarray,
                      feats: np.ndarray, q: np.ndarray, dtype: str = "float32") -> dict[str, dict]:
    """Write one (checkpoint, shard) atomically; return the records the driver puts in the manifest.

    Safe to call from a worker: touches only this shard's files, never the manifest.
    """
    root = Path(root)
    ids = np.asarray(ids, dtype=np.int64)
    feats = np.asarray(feats, dtype=np.float32)
    q = np.asarray(q, dtype=np.float32)
    if feats.ndim != 2 or ids.shape != (feats.shape[0],) or q.shape != (feats.shape[0],):
        raise ShapeError(f"shard arrays disagree: ids {ids.shape}, feats {feats.shape}, q {q.shape}")
    if not (np.isfinite(feats).all() and np.isfinite(q).all()):
        raise StoreError("refusing to store NaN or infinite features; fix the featurizer input")
    stored = feats.astype(dtype)
    if dtype == "float16" and not np.isfinite(stored).all():
        raise StoreError("features overflow float16; store them as float32")
    records = {}
    for kind, ckpt, arr in (("ids", None, ids), ("features", checkpoint, stored), ("q", checkpoint, q)):
        path = shard_path(root, kind, ckpt, shard)
        save_npy(path, arr)
        records[shard_key(kind, ckpt, shard)] = {
            "file": str(path.relative_to(root)), "rows": int(arr.shape[0]),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return records


class FeatureStore:
    """A store folder; create it with :meth:`create`, reopen with :meth:`open`.

    Manifest fields: ``format``, ``version``, ``fingerprint`` (hash of the resolved config),
    ``spec`` (featurizer/projector settings), ``n`` examples, ``k``, ``dtype``, ``shard_size``,
    ``checkpoints`` (ids), ``complete`` (records of finished shard files).
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, root: str | Path, *, n: int, k: int, checkpoints: Sequence[int],
               shard_size: int, fingerprint: str, spec: dict[str, Any],
               dtype: str = "float32") -> "FeatureStore":
        """Open the store at ``root`` for this configuration, creating it if absent.

        An existing store with the same fingerprint is reopened (to resume); a different
        fingerprint raises :class:`FingerprintMismatchError`; a non-empty folder without a
        manifest raises :class:`ForeignStoreError`.
        """
        root = Path(root)
        if dtype not in DTYPES:
            raise StoreError(f"store dtype {dtype!r} is unsupported; use one of {DTYPES}")
        if n < 1 or k < 1 or shard_size < 1 or not checkpoints:
            raise StoreError(f"store needs n, k, shard_size >= 1 and checkpoints, got n={n} k={k} "
                             f"shard_size={shard_size} checkpoints={list(checkpoints)}")
        if (root / MANIFEST).exists():
            store = cls.open(root)
            store.check_fingerprint(fingerprint, spec)
            return store
        if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
            raise ForeignStoreError(
                f"{root} is not empty and has no {MANIFEST}: it is not a tda store; choose an "
                "empty or new folder"
            )
        manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "spec": spec,
                    "n": int(n), "k": int(k), "dtype": dtype, "shard_size": int(shard_size),
                    "checkpoints": [int(c) for c in checkpoints], "complete": {}}
        store = cls(root, manifest)
        store._save_manifest()
        return store

    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        """Open an existing store, validating its manifest."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            hint = "it is not a tda store" if root.exists() else "the folder does not exist"
            raise ForeignStoreError(f"{root} has no {MANIFEST} ({hint}); run featurization first")
        try:
            manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise StoreCorruptError(f"{path} is not valid JSON ({exc}); re-run featurization into a new folder") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ForeignStoreError(f"{path} was not written by a tda feature store")
        if manifest.get("version") != VERSION:
            raise StoreError(f"store version {manifest.get('version')} is not supported (expected {VERSION})")
        missing = {"n", "k", "dtype", "shard_size", "checkpoints", "complete", "fingerprint"} - set(manifest)
        if missing:
            raise StoreCorruptError(f"{path} lacks fields {sorted(missing)}; the store is damaged")
        return cls(root, manifest)

    def check_fingerprint(self, fingerprint: str, spec: dict[str, Any] | None = None) -> None:
        if self.manifest["fingerprint"] == fingerprint:
            return
        old = self.manifest.get("spec", {})
        diff = sorted(k for k in set(old) | set(spec or {}) if old.get(k) != (spec or {}).get(k))
        raise FingerprintMismatchError(
            f"{self.root} holds features of a different configuration (differs in {diff or 'settings'}); "
            "use another store folder, or pass overwrite to replace it"
        )

    def _save_manifest(self) -> None:
        save_json(self.root / MANIFEST, self.manifest)

    # ---------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def checkpoints(self) -> list[int]:
        return list(self.manifest["checkpoints"])

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n / self.manifest["shard_size"])

    def __len__(self) -> int:
        return self.n

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Dataset rows [lo, hi) of a shard."""
        size = self.manifest["shard_size"]
        return shard * size, min((shard + 1) * size, self.n)

    # ---------------------------------------------------------------- writing (driver)
    def is_done(self, checkpoint: int, shard: int) -> bool:
        return shard_key("features", checkpoint, shard) in self.manifest["complete"]

    def pending(self) -> list[tuple[int, int]]:
        """(checkpoint, shard) pairs not yet recorded as complete."""
        return [(c, s) for c in self.checkpoints for s in range(self.n_shards) if not self.is_done(c, s)]

    def is_complete(self) -> bool:
        return not self.pending()

    def record(self, records: dict[str, dict]) -> None:
        """Record finished shard files (driver only), after checking them on disk."""
        for key, rec in records.items():
            kind, ckpt, shard = key.split("/")
            lo, hi = self.shard_rows(int(shard))
            if rec["rows"] != hi - lo:
                raise StoreCorruptError(f"shard {key} has {rec['rows']} rows, expected {hi - lo}")
            if kind == "ids":
                old = self.manifest["complete"].get(key)
                if old is not None and old["sha256"] != rec["sha256"]:
                    raise StoreCorruptError(
                        f"example ids of shard {shard} changed between checkpoints; the data order "
                        "must be the same for every checkpoint"
                    )
        # ids and q first, features last: a shard is done when its features record exists
        for key in sorted(records, key=lambda k: k.startswith("features")):
            self.manifest["complete"][key] = records[key]
        self._save_manifest()

    def write_shard(self, checkpoint: int, shard: int, ids: np.ndarray, feats: np.ndarray, q: np.ndarray) -> None:
        """Write and record one shard (local, single-process use)."""
        if checkpoint not in self.checkpoints:
            raise StoreError(f"checkpoint {checkpoint} is not one of the store's {self.checkpoints}")
        if feats.ndim != 2 or feats.shape[1] != self.k:
            raise ShapeError(f"features must be (rows, {self.k}), got {feats.shape}")
        self.record(write_shard_files(self.root, checkpoint, shard, ids, feats, q, self.manifest["dtype"]))

    # ---------------------------------------------------------------- reading
    def _load(self, kind: str, checkpoint: int | None, shard: int) -> np.ndarray:
        key = shard_key(kind, checkpoint, shard)
        rec = self.manifest["complete"].get(key)
        if rec is None:
            raise StoreError(f"shard {key} of {self.root} is not complete; resume featurization first")
        path = self.root / rec["file"]
        if not path.is_file() or path.stat().st_size != rec["bytes"]:
            raise StoreCorruptError(
                f"{path} is missing or truncated (expected {rec['bytes']} bytes); delete its record by "
                "re-running featurization with overwrite, or restore the file"
            )
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise StoreCorruptError(f"{path} is not a readable .npy file ({exc})") from exc
        if arr.shape[0] != rec["rows"]:
            raise StoreCorruptError(f"{path} has {arr.shape[0]} rows, the manifest says {rec['rows']}")
        return arr

    def ids(self) -> np.ndarray:
        """All example ids in store order, (n,) int64."""
        return np.concatenate([np.asarray(self._load("ids", None, s)) for s in range(self.n_shards)])

    def read_shard(self, shard: int) -> FeatureBlock:
        """Shard ``shard`` under every checkpoint as one block (features as float32)."""
        feats = np.stack([np.asarray(self._load("features", c, shard), dtype=np.float32) for c in self.checkpoints])
        q = np.stack([np.asarray(self._load("q", c, shard)) for c in self.checkpoints])
        return FeatureBlock(np.asarray(self._load("ids", None, shard)), feats, q)

    def iter_blocks(self, block_rows: int = 4096) -> Iterator[FeatureBlock]:
        """Blocks of at most ``block_rows`` rows over the whole (complete) store."""
        if not self.is_complete():
            raise StoreError(f"{self.root} is incomplete ({len(self.pending())} shards pending); resume featurization")
        for s in range(self.n_shards):
            blk = self.read_shard(s)
            for lo in range(0, len(blk), block_rows):
                yield blk.select(slice(lo, lo + block_rows))

    def verify(self) -> None:
        """Check every recorded file against its sha256; raise :class:`StoreCorruptError` on the first bad one."""
        for key, rec in self.manifest["complete"].items():
            path = self.root / rec["file"]
            if not path.is_file() or sha256_file(path) != rec["sha256"]:
                raise StoreCorruptError(f"{path} ({key}) does not match its checksum; re-featurize that shard")
