"""Append-only, chunked feature store with a JSON manifest.

Layout of a store folder::

    manifest.json                       what the store holds, which shards are complete
    ids/shard-00000.npy                 (rows,) int64 example ids
    features/ckpt-000/shard-00000.npy   (rows, k) float32 or float16 projected gradients
    q/ckpt-000/shard-00000.npy          (rows,) float32 loss weights Q

Paths are pure functions of (kind, checkpoint, shard). Shard files are written to a temporary
name and renamed into place by whoever computes them (a worker may); a shard counts as done only
once the manifest records it, and only the driver writes the manifest. Arrays are plain ``.npy``
read with ``allow_pickle=False`` (memory-mapped), so nothing in a store is ever unpickled.
Shard paths and the validated write of one shard are in :mod:`stores.shards`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tda.errors import FingerprintMismatchError, ForeignStoreError, ShapeError, StoreCorruptError, StoreError
from tda.core.features import FeatureBlock

from stores._io import save_json, sha256_file
from stores.shards import _refuse_duplicates, shard_key, shard_path, write_shard_files

logger = logging.getLogger(__name__)

FORMAT = "tda-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")
REPAIR_HINT = ("re-featurize the damaged shards with `tda run CONFIG --repair` (or FeatureStore.repair() and "
               "resume), or restore the file")



class FeatureStore:
    """A store folder; create it with :meth:`create`, reopen with :meth:`open`.

    Manifest fields: ``format``, ``version``, ``fingerprint`` (hash of the resolved config),
    ``spec`` (featurizer/projector settings), ``n`` examples, ``k``, ``dtype``, ``shard_size``,
    ``checkpoints`` (ids), ``complete`` (records of finished shard files).
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()  # files whose sha256 was checked by this instance
        self._sorted_ids: np.ndarray | None = None  # ids of recorded shards, sorted (duplicate check)

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
            store._check_layout(n=int(n), k=int(k), dtype=dtype, shard_size=int(shard_size),
                                checkpoints=[int(c) for c in checkpoints])
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
            raise StoreCorruptError(
                f"{path} is not valid JSON ({exc}); the store's record of finished shards is lost: restore "
                f"the file, or delete {root} and featurize again"
            ) from exc
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

    def _check_layout(self, **wanted: Any) -> None:
        """Refuse to append to a store whose shape settings differ (even under the same fingerprint)."""
        diff = {key: (self.manifest.get(key), value) for key, value in wanted.items() if self.manifest.get(key) != value}
        if diff:
            detail = ", ".join(f"{key}: stored {old!r}, asked {new!r}" for key, (old, new) in diff.items())
            raise FingerprintMismatchError(
                f"{self.root} was created with other settings ({detail}); use another store folder, or "
                "delete this one to featurize again"
            )

    def _save_manifest(self) -> None:
        save_json(self.root / MANIFEST, self.manifest)

    def remove_orphans(self) -> list[Path]:
        """Delete temporary files left by writers that were killed mid-write (call under the lock)."""
        orphans = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        for p in orphans:
            p.unlink(missing_ok=True)
        if orphans:
            logger.info("removed %d temporary files of an interrupted writer in %s", len(orphans), self.root)
        return orphans

    def drop_unrecorded_ids(self, shards: Iterable[int]) -> None:
        """Delete ids files of ``shards`` that the manifest does not record (left by a writer whose
        record never arrived), so that parallel writers start from a clean slate (under the lock)."""
        for s in shards:
            if shard_key("ids", None, s) not in self.manifest["complete"]:
                shard_path(self.root, "ids", None, s).unlink(missing_ok=True)

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

    def _check_record(self, key: str, rec: dict) -> None:
        kind, ckpt, shard = key.split("/")
        expected = shard_path(self.root, kind, None if ckpt == "-" else int(ckpt), int(shard))
        if rec.get("file") != str(expected.relative_to(self.root)):
            raise StoreCorruptError(f"record {key} names file {rec.get('file')!r}, expected {expected}")
        lo, hi = self.shard_rows(int(shard))
        if rec["rows"] != hi - lo:
            raise StoreCorruptError(f"shard {key} has {rec['rows']} rows, expected {hi - lo}")
        if kind == "features" and "shape" in rec and (list(rec["shape"]) != [hi - lo, self.k]
                                                       or rec["dtype"] != self.manifest["dtype"]):
            raise ShapeError(f"shard {key} holds {rec['dtype']} features of shape {rec['shape']}, the store "
                             f"{self.manifest['dtype']} ({hi - lo}, {self.k}); featurize with k={self.k}")
        path = self.root / rec["file"]
        if not path.is_file() or path.stat().st_size != rec["bytes"]:
            raise StoreCorruptError(f"{path} is missing or has the wrong size; write shard {key} again")

    def _all_ids_sorted(self) -> np.ndarray:
        if self._sorted_ids is None:
            parts = [np.asarray(self._load("ids", None, s)) for s in range(self.n_shards)
                     if shard_key("ids", None, s) in self.manifest["complete"]]
            self._sorted_ids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return self._sorted_ids

    def record(self, records: dict[str, dict]) -> None:
        """Record finished shard files (driver only), after checking them on disk.

        Raises :class:`StoreCorruptError` when a shard's ids changed between checkpoints and
        :class:`DuplicateIdError` when a new shard repeats ids of another shard; nothing is
        recorded then.
        """
        known = self._all_ids_sorted() if any(k.startswith("ids/") for k in records) else None
        for key, rec in records.items():
            self._check_record(key, rec)
            kind, _, shard = key.split("/")
            if kind != "ids":
                continue
            old = self.manifest["complete"].get(key)
            if old is not None:
                if old["sha256"] != rec["sha256"]:
                    raise StoreCorruptError(
                        f"example ids of shard {shard} changed between checkpoints; the data order "
                        "must be the same for every checkpoint"
                    )
                continue
            new = np.load(self.root / rec["file"], allow_pickle=False)
            _refuse_duplicates(int(shard), new, known)
            known = np.sort(np.concatenate([known, new]))
        self._sorted_ids = known if known is not None else self._sorted_ids
        # ids and q first, features last: a shard is done when its features record exists
        for key in sorted(records, key=lambda k: k.startswith("features")):
            self.manifest["complete"][key] = records[key]
        self._save_manifest()

    def write_shard(self, checkpoint: int, shard: int, ids: np.ndarray, feats: np.ndarray, q: np.ndarray) -> None:
        """Write and record one shard (local, single-process use)."""
        if checkpoint not in self.checkpoints:
            raise StoreError(f"checkpoint {checkpoint} is not one of the store's {self.checkpoints}")
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"shard {shard} is out of range: the store has shards 0..{self.n_shards - 1}")
        if self.is_done(checkpoint, shard):
            raise StoreError(
                f"shard {shard} of checkpoint {checkpoint} is already complete in {self.root}; stores are "
                "append-only: featurize into a new folder to change stored features"
            )
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.k:
            raise ShapeError(f"features must be (rows, {self.k}), got {feats.shape}; featurize with k={self.k}")
        lo, hi = self.shard_rows(shard)
        if feats.shape[0] != hi - lo:
            raise StoreCorruptError(f"shard {shard} holds dataset rows {lo}..{hi - 1} ({hi - lo} rows), got "
                                    f"{feats.shape[0]} rows; pass exactly the rows of store.shard_rows({shard})")
        if shard_key("ids", None, shard) not in self.manifest["complete"]:
            _refuse_duplicates(shard, np.asarray(ids), self._all_ids_sorted())
            shard_path(self.root, "ids", None, shard).unlink(missing_ok=True)  # unrecorded: an orphan
        self.record(write_shard_files(self.root, checkpoint, shard, ids, feats, q, self.manifest["dtype"]))

    # ---------------------------------------------------------------- reading
    def _check_file(self, key: str, rec: dict, checksum: bool = True) -> Path:
        """Path of a recorded file after checking its size and (once per instance) its sha256.
        The path comes from the record's key, never from the manifest's text: a record naming
        another file (``../../x``, an absolute path) is corrupt, and nothing outside the store is read."""
        path = self._expected_path(key)
        if rec.get("file") != str(path.relative_to(self.root)):
            raise StoreCorruptError(f"record {key} of {self.root} names file {rec.get('file')!r} instead of "
                                    f"{path.relative_to(self.root)}; {REPAIR_HINT}")
        if not path.is_file():
            raise StoreCorruptError(f"{path} ({key}) is missing; {REPAIR_HINT}")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise StoreCorruptError(
                f"{path} ({key}) is truncated or was overwritten: {size} bytes, the manifest says "
                f"{rec['bytes']}; {REPAIR_HINT}"
            )
        if checksum and key not in self._verified:
            if sha256_file(path) != rec["sha256"]:
                raise StoreCorruptError(f"{path} ({key}) does not match its checksum in the manifest; {REPAIR_HINT}")
            self._verified.add(key)
        return path

    def _load(self, kind: str, checkpoint: int | None, shard: int) -> np.ndarray:
        key = shard_key(kind, checkpoint, shard)
        rec = self.manifest["complete"].get(key)
        if rec is None:
            raise StoreError(f"shard {key} of {self.root} is not complete; resume featurization first")
        path = self._check_file(key, rec)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise StoreCorruptError(f"{path} is not a readable .npy file ({exc}); {REPAIR_HINT}") from exc
        if arr.shape[0] != rec["rows"]:
            raise StoreCorruptError(f"{path} has {arr.shape[0]} rows, the manifest says {rec['rows']}; {REPAIR_HINT}")
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
        """Check every recorded file against its size and sha256; raise :class:`StoreCorruptError` on the first bad one."""
        for key, rec in self.manifest["complete"].items():
            self._verified.discard(key)
            self._check_file(key, rec)

    def _expected_path(self, key: str) -> Path:
        try:
            kind, ckpt, shard = key.split("/")
            if kind not in ("ids", "features", "q"):
                raise ValueError(kind)
            return shard_path(self.root, kind, None if ckpt == "-" else int(ckpt), int(shard))
        except ValueError as exc:
            raise StoreCorruptError(f"{self.root} records an unknown key {key!r}; {REPAIR_HINT}") from exc

    def repair(self) -> list[str]:
        """Drop the records of missing, truncated or corrupt files so that featurization redoes them.

        A bad ids file drops its shard under every checkpoint (they share it). Returns the
        dropped record keys; the manifest is saved only when something was dropped.
        """
        bad: set[str] = set()
        for key, rec in self.manifest["complete"].items():
            try:
                self._verified.discard(key)
                self._check_file(key, rec)
            except StoreCorruptError as exc:
                logger.warning("%s", exc)
                bad.add(key)
        drop = set(bad)
        for key in bad:
            try:
                self._expected_path(key)
            except StoreCorruptError:
                continue  # an unknown key: its record is dropped, no file is touched
            kind, ckpt, shard = key.split("/")
            ckpts = self.checkpoints if kind == "ids" else [int(ckpt)]
            drop |= {shard_key(kd, c, int(shard)) for kd in ("features", "q") for c in ckpts}
        drop &= set(self.manifest["complete"])
        if drop:
            for key in sorted(drop):
                self.manifest["complete"].pop(key)
                try:
                    self._expected_path(key).unlink(missing_ok=True)  # inside the store, whatever the record said
                except StoreCorruptError:
                    pass
            self._sorted_ids = None
            self._save_manifest()
        return sorted(drop)
