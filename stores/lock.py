"""A single-writer lock on a store directory (a file created with O_EXCL)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

from tda.errors import StoreLockedError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive write lock; a second writer gets :class:`StoreLockedError`.

    A lock left by a dead process on this host is taken over; one held by a live process, or
    by another host, is refused with a message naming the holder.
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == me["host"]
                if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # stale lock of a dead process
                    continue
                raise StoreLockedError(
                    f"{self.path.parent} is being written by another process {holder or '(unknown)'}; "
                    f"wait for it to finish, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise StoreLockedError(f"could not take the lock {self.path}; delete it if no job is running")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
