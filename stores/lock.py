"""A single-writer lock on a store or run directory.

The lock is the file ``.lock`` holding the writer's pid and host (for messages), guarded by an
exclusive ``flock``: the kernel drops it the moment the writer exits or is killed (SIGKILL,
OOM, pre-emption), so a lock file left by a dead writer never blocks the next run. Where
``flock`` is unavailable the file is created with ``O_EXCL`` and a lock whose pid is dead (or a
zombie) on this host is taken over.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from tda.errors import StoreLockedError

from stores._io import disk_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    """Whether ``pid`` names a running (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class StoreLock:
    """Exclusive write lock; a second writer gets :class:`StoreLockedError`.

    A lock left by a dead process on this host is taken over; one held by a live process, or
    by another host, is refused with a message naming the holder.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self.held = False
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _refuse(self, holder: dict) -> StoreLockedError:
        return StoreLockedError(
            f"{self.path.parent} is being written by another process {holder or '(unknown)'}; "
            f"wait for it to finish, or delete {self.path} if that process is gone"
        )

    def _me(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()

    def acquire(self) -> "StoreLock":
        """Take the lock; :class:`StoreLockedError` if another writer holds it, a
        :class:`~tda.errors.StoreError` naming the fix if the folder refuses the lock file."""
        try:
            return self._acquire()
        except OSError as exc:  # a read-only folder, a full disk: the lock file cannot be made
            error = disk_error(exc, self.path)
            if error is exc:
                raise
            raise error from exc

    def _acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self._acquire_exclusive_create()
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._holder()) from None
            except OSError:  # file system without flock
                os.close(fd)
                return self._acquire_exclusive_create()
            try:  # the previous holder may have released and unlinked it meanwhile: retry on the new file
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            holder = self._holder() if same else {}
            if same and holder.get("host") not in (None, socket.gethostname()):
                os.close(fd)  # a writer on another host: flock may not reach it over a network file system
                raise self._refuse(holder)
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._me())
            self._fd, self.held = fd, True
            return self
        raise StoreLockedError(f"could not take the lock {self.path}; delete it if no job is running")

    def _acquire_exclusive_create(self) -> "StoreLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == socket.gethostname()
                if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # stale lock of a dead process
                    continue
                raise self._refuse(holder) from None
            os.write(fd, self._me())
            os.close(fd)
            self.held = True
            return self
        raise StoreLockedError(f"could not take the lock {self.path}; delete it if no job is running")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)  # unlink before unlocking: waiters then see a new inode
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.held = False

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
