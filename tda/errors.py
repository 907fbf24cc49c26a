"""Exception hierarchy for `tda`.

Every user-facing error derives from :class:`TDAError` (a ``ValueError``) and its message says
what was wrong and how to fix it. Library code never uses ``assert`` for user input.
"""

from __future__ import annotations


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


class StoreLockedError(StoreError):
    """Another process holds the write lock of a store."""


class QueryError(TDAError):
    """A query names an example id that does not exist or asks for an impossible k."""


class MissingDependencyError(TDAError, ImportError):
    """An optional backend was requested but its package is not installed."""
