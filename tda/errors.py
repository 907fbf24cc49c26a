"""Exception hierarchy for `tda`.

Every user-facing error derives from :class:`TDAError` (a ``ValueError``) and its message says
what was wrong and how to fix it. Library code never uses ``assert`` for user input.
"""

from __future__ import annotations

import os


class TDAError(ValueError):
    """Base class of all errors raised by tda, stores and pipelines."""


class ConfigError(TDAError):
    """A configuration value is unknown, misspelt, missing or out of range."""


class DataError(TDAError):
    """Input data is missing, empty, malformed or has the wrong shape or dtype."""


class ShapeError(DataError):
    """A tensor or array has a shape that does not match what the operation needs."""


class DTypeError(DataError):
    """A tensor or array has a dtype the operation cannot use (e.g. integer features, float ids)."""


class DuplicateIdError(DataError):
    """Example ids are not unique (within a data set, or across the shards of a store)."""


class LeakageError(DataError):
    """Examples a scorer is fitted on overlap the examples it attributes or is evaluated on
    (e.g. AirRep training queries that are also training examples or evaluation queries)."""


class NonFiniteError(TDAError):
    """Gradients, features or scores contain NaN or infinite values."""


class CheckpointError(TDAError):
    """A checkpoint is missing or does not match the model architecture."""


class StoreError(TDAError):
    """A feature store or index cannot be used as asked."""


class StoreCorruptError(StoreError):
    """A store file is truncated, corrupt or disagrees with the manifest."""


class ForeignStoreError(StoreError):
    """A directory holds files that were not written by a tda store."""


class NonFiniteFeaturesError(NonFiniteError, StoreError):
    """Features handed to a store are NaN or infinite; nothing was written."""


class FingerprintMismatchError(StoreError):
    """A store was written with a different configuration (projection, seed, k, ...)."""


class IndexMismatchError(FingerprintMismatchError):
    """A FAISS index was built for another scorer, store or configuration (dimension, size, fingerprint)."""


class InputChangedError(StoreError):
    """An input of a finished run (a checkpoint, a data file) changed after the run was made."""


class StoreLockedError(StoreError):
    """Another process holds the write lock of a store."""


class QueryError(TDAError):
    """A query names an example id that does not exist or asks for an impossible k."""


class MissingDependencyError(TDAError, ImportError):
    """An optional backend was requested but its package is not installed."""


class reading:
    """Context manager for every file reader: what a reader raises (``OSError``, a decoder's or a
    parser's own exception) becomes ``error`` naming the file and the fix. Permission denied, a
    folder where a file is expected and a missing file are told apart; anything else is a damaged
    file, fixed by ``fix``. ``TDAError`` s pass unchanged.

    Example: ``with reading(path, "data.query_path", "check the file and its format"): ...``
    """

    def __init__(self, path: object, what: str, fix: str, error: type[TDAError] = DataError) -> None:
        self.path, self.what, self.fix, self.error = path, what, fix, error

    def __enter__(self) -> "reading":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, TDAError) or not isinstance(exc, Exception):
            return False
        raise self.failure(exc) from exc

    def failure(self, exc: BaseException) -> TDAError:
        """The :class:`TDAError` for ``exc`` raised while reading the file."""
        where = f"{self.what} {self.path}" if self.what else str(self.path)
        if isinstance(exc, PermissionError):
            return self.error(f"permission denied reading {where}; make it readable by this user (chmod / chown) "
                              "or copy it to a folder you can read")
        if isinstance(exc, IsADirectoryError):
            return self.error(f"{where} is a folder, not a file; point it at the file")
        if isinstance(exc, FileNotFoundError) and not os.path.exists(str(self.path)):
            return self.error(f"{where} does not exist; check the path")
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        return self.error(f"{where} cannot be read ({type(exc).__name__}{': ' + reason if reason else ''}); "
                          f"{self.fix}")
