"""Content digests of a run's inputs (data files and folders, checkpoints, model folders).

A run names its inputs by content, not by path: the same data moved or spelled another way is
the same input, and data changed in place is a different one. A file's digest is the sha256 of
its bytes; a folder's is the sha256 of its files' relative paths and digests (hidden names,
starting with ``.``, and folders written by tda, are left out). Each file is read once: its digest is remembered under its
``(size, mtime_ns, ctime_ns, inode)``, in memory and in a JSON cache file (a run folder's
``inputs.json``). Any write to a file changes its ctime, which no tool can set back, so a
remembered digest is never stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tda.errors import StoreError

from stores._io import save_json, sha256_file

CACHE_FORMAT = "tda-input-digests"


def _tda_made(folder: Path) -> bool:
    """A run folder or store made by tda (left out of folder digests: a run may live inside its data folder)."""
    return any((folder / name).exists() for name in TDA_MARKERS)


#: Files that mark a folder written by tda.
TDA_MARKERS = ("run.json", ".lock", "manifest.json")


def stat_stamp(st: os.stat_result) -> list[int]:
    """What changes when a file is rewritten: size, modification and change times, inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestCache:
    """Digests of files and folders, each file hashed once per change (see the module docstring)."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[list[int], str]] = {}
        self._dirty = False

    def load(self, file: Path) -> None:
        """Add the entries of a cache file; a missing or damaged one is ignored (it is only a cache)."""
        try:
            data = json.loads(Path(file).read_text())
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return
        for path, entry in (data.get("files") or {}).items():
            if (isinstance(entry, dict) and isinstance(entry.get("stamp"), list)
                    and isinstance(entry.get("sha256"), str)):
                self._memo.setdefault(path, (entry["stamp"], entry["sha256"]))

    def save(self, file: Path) -> None:
        """Write the remembered digests to ``file`` (atomically) if any were added."""
        if not self._dirty:
            return
        files = {p: {"stamp": s, "sha256": d} for p, (s, d) in sorted(self._memo.items())}
        save_json(Path(file), {"format": CACHE_FORMAT, "files": files})
        self._dirty = False

    def file_digest(self, path: Path) -> str:
        key = str(Path(path).resolve())
        stamp = stat_stamp(os.stat(key))
        hit = self._memo.get(key)
        if hit is not None and list(hit[0]) == stamp:
            return hit[1]
        digest = sha256_file(Path(key))
        self._memo[key] = (stamp, digest)
        self._dirty = True
        return digest

    def digest(self, path: str | Path) -> str | None:
        """sha256 of a file, or of a folder's files (relative paths and digests); ``None`` if ``path``
        does not exist (the loader that reads it reports that)."""
        path = Path(path)
        try:
            if path.is_file():
                return self.file_digest(path)
            return self._folder_digest(path) if path.is_dir() else None
        except (OSError, StoreError):
            return None  # unreadable: the loader that reads it names the problem and the fix

    def _folder_digest(self, path: Path) -> str:
        h = hashlib.sha256()
        listed = saved_dataset_files(path)
        if listed is not None:  # a datasets save_to_disk folder: its data, not the caches .map() leaves beside it
            for name in listed:
                h.update(f"{name}\0{self.file_digest(path / name)}\n".encode())
            return h.hexdigest()
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _tda_made(Path(dirpath) / d))
            for name in sorted(f for f in filenames if not f.startswith(".")):
                full = Path(dirpath) / name
                if full.is_file():
                    h.update(f"{full.relative_to(path).as_posix()}\0{self.file_digest(full)}\n".encode())
        return h.hexdigest()


def saved_dataset_files(folder: Path) -> list[str] | None:
    """The files a ``datasets`` ``save_to_disk`` folder consists of (``state.json``,
    ``dataset_info.json`` and the Arrow files ``state.json`` lists), or None for another folder.
    ``Dataset.map`` and friends write ``cache-*.arrow`` files into the folder; they are not the data."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (folder / "dataset_info.json").is_file() or not all(isinstance(f, str) and (folder / f).is_file()
                                                                for f in files):
        return None
    return ["dataset_info.json", "state.json", *sorted(files)]


#: The process's cache: a run loads its ``inputs.json`` into it (:func:`pipelines.run.claim_run_dir`).
DIGESTS = DigestCache()


def content_digest(path: str | Path) -> str | None:
    """:meth:`DigestCache.digest` with the process's cache."""
    return DIGESTS.digest(path)
