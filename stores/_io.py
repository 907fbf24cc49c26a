"""Atomic file writes and checksums shared by the feature store and the index."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, then ``os.replace`` it.

    A crash leaves either the old file or the new one, never a partial file under ``path``.
    """
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600: follow the umask, as open() does
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    except RuntimeError as exc:  # a C++ writer (faiss.write_index) reports a failed write so
        raise disk_error(OSError(None, str(exc).strip().splitlines()[-1] if str(exc).strip() else "write failed"),
                         path) from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def disk_error(exc: OSError, path: Path) -> Exception:
    """A :class:`~tda.errors.StoreError` naming the fix for a full disk (ENOSPC, EDQUOT, or a short
    write without an errno, as numpy reports one), a refused write or a file-size limit (EFBIG);
    other errors are returned unchanged."""
    from tda.errors import StoreError

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"the disk is full writing {path} ({exc.strerror}); free space on that file system or "
                          "choose another out_dir, then rerun: finished work is kept and the file was not replaced")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return StoreError(f"cannot write {path} ({exc.strerror}): its folder is read-only or not yours; make it "
                          "writable, or choose a folder you can write to (--out / out_dir)")
    if exc.errno == errno.EFBIG:
        return StoreError(f"{path} would exceed the largest file this system allows ({exc.strerror}: a ulimit -f or "
                          "the file system's limit); raise the limit or choose another out_dir, then rerun: finished "
                          "work is kept and the file was not replaced")
    if exc.errno is None:  # numpy's "8192 requested and 8160 written", faiss's failed fwrite: a short write
        return StoreError(f"writing {path} failed ({exc.strerror or exc}): a short write is usually a full disk; free "
                          "space or choose another out_dir, then rerun: finished work is kept and the file was not "
                          "replaced")
    return exc


def reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of ``path`` on disk now (a memory map of a sparse file on a full disk
    dies of SIGBUS later); raises the :func:`disk_error` of a full disk."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (no race with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomically save one array as ``.npy`` (never pickled)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)

    atomic_write(path, write)


def save_json(path: Path, obj: Any) -> None:
    """Atomically save JSON with sorted keys."""

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))

    atomic_write(path, write)


def json_field(path: Path, key: str) -> Any:
    """``key`` of a JSON object file, or None when the file is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes; a file the OS refuses to read is a ``StoreError`` naming the fix."""
    h = hashlib.sha256()
    try:
        fh = open(path, "rb")
    except PermissionError as exc:
        from tda.errors import StoreError, reading

        raise reading(path, "", "", StoreError).failure(exc) from exc
    with fh:
        while True:
            data = fh.read(chunk)
            if not data:
                break
            h.update(data)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomically save named arrays as an uncompressed ``.npz`` (loaded with allow_pickle=False)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


#: Suffix of a folder being removed by :func:`remove_tree` (swept by :func:`sweep_removed`).
REMOVING = ".removing"


def remove_tree(path: Path) -> None:
    """Remove a folder so that a kill at any instant leaves it whole or absent, never half-deleted:
    it is renamed to a hidden sibling (atomic) and that is deleted; a leftover is swept later."""
    trash = path.with_name(f".{path.name}{REMOVING}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def sweep_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder`` (and below):
    ``.NAME.XXXX.tmp``, never a finished file."""
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def sweep_removed(root: Path) -> None:
    """Delete what a killed :func:`remove_tree` left in ``root``."""
    for trash in root.glob(f".*{REMOVING}"):
        shutil.rmtree(trash, ignore_errors=True)
