"""Data the Python API takes besides a ``datasets.Dataset``: tensors, a PyTorch ``Dataset`` or a
``DataLoader``, each turned into ``(ids, batch)`` pairs exactly as stated here (no other transform).

- a mapping of tensors or arrays with one first dimension, ``{"x": X, "y": Y}``: batch ``b`` is
  ``{key: value[rows of b]}`` (numpy arrays become tensors, dtypes kept);
- a pair ``(X, Y)`` of tensors: the batch ``{"x": X[rows], "y": Y[rows]}``, the keys
  :class:`tda.models.tasks.ClassificationTask` reads (any other length is an error: pass a mapping);
- a map-style ``torch.utils.data.Dataset``: ``batch_size`` items at a time through
  ``torch.utils.data.default_collate``, then as a mapping or a pair above;
- a ``torch.utils.data.DataLoader``: its own batches, in its order, as a mapping or a pair (a
  loader that shuffles is refused: positions are the ids, so its order must be fixed).

Rows are identified by position, ``0 .. n-1`` (a ``datasets.Dataset`` uses its ``id`` column).
With a ``collate``, each batch above is passed through it (for example to move or cast columns);
without one (``None``) it reaches the task as is.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from tda.errors import DataError

ACCEPTED = ("a datasets.Dataset, a mapping of tensors {'x': X, 'y': Y}, a pair (X, Y) of tensors, a "
            "torch.utils.data.Dataset or a torch.utils.data.DataLoader (shuffle=False)")


def is_hf_dataset(data: Any) -> bool:
    """Whether ``data`` is a ``datasets.Dataset`` (checked without importing ``datasets``)."""
    return hasattr(data, "with_format") and hasattr(data, "column_names")


def num_rows(data: Any) -> int:
    """Examples in ``data`` (any of :data:`ACCEPTED`)."""
    if is_hf_dataset(data):
        return len(data)
    if isinstance(data, torch.utils.data.DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    if isinstance(data, Mapping):
        return _mapping_rows(data)
    if isinstance(data, (tuple, list)):
        return _mapping_rows(pair_batch(data))
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    raise DataError(f"cannot read {type(data).__name__} as data; pass {ACCEPTED}")


def pair_batch(data: tuple | list) -> dict[str, Any]:
    """A pair ``(X, Y)`` as ``{"x": X, "y": Y}``; any other length is an error naming the fix."""
    if len(data) != 2:
        raise DataError(f"a sequence of {len(data)} tensors is ambiguous as data; pass a pair (X, Y), read as "
                        "{'x': X, 'y': Y}, or a mapping naming each tensor as your task reads it")
    return {"x": data[0], "y": data[1]}


def _mapping_rows(data: Mapping) -> int:
    if not data:
        raise DataError("the mapping of tensors is empty; pass at least one tensor, e.g. {'x': X, 'y': Y}")
    sizes = {}
    for key, value in data.items():
        shape = getattr(value, "shape", None)
        if not shape:
            raise DataError(f"data[{key!r}] is a {type(value).__name__}, not a tensor or array with a first "
                            "dimension of examples")
        sizes[key] = int(shape[0])
    if len(set(sizes.values())) != 1:
        raise DataError(f"the tensors have different numbers of examples {sizes}; every tensor's first dimension "
                        "must count the same examples")
    return next(iter(sizes.values()))


def _as_batch(batch: Any) -> dict[str, Tensor]:
    """A loader's or collated items' batch as a dict of tensors (mapping or pair, as documented)."""
    if isinstance(batch, Mapping):
        return {k: torch.as_tensor(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return {k: torch.as_tensor(v) for k, v in pair_batch(batch).items()}
    raise DataError(f"a batch of the data is a {type(batch).__name__}; items must be mappings of tensors or "
                    "(x, y) pairs")


def iter_source_batches(data: Any, collate: Callable | None, batch_size: int, start: int = 0,
                        stop: int | None = None) -> Iterator[tuple[np.ndarray, dict[str, Tensor]]]:
    """``(ids, batch)`` over positions ``[start, stop)`` of tensors, a PyTorch ``Dataset`` or a
    ``DataLoader`` (see the module docstring); ids are positions."""
    n = num_rows(data)
    stop = n if stop is None else min(stop, n)
    finish = collate if collate is not None else (lambda b: b)
    if isinstance(data, torch.utils.data.DataLoader):
        yield from _loader_batches(data, finish, start, stop)
        return
    if isinstance(data, (Mapping, tuple, list)):
        table = dict(data) if isinstance(data, Mapping) else pair_batch(data)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield np.arange(lo, hi, dtype=np.int64), finish({k: torch.as_tensor(v[lo:hi]) for k, v in table.items()})
        return
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        items = torch.utils.data.default_collate([data[i] for i in range(lo, hi)])
        yield np.arange(lo, hi, dtype=np.int64), finish(_as_batch(items))


def _loader_batches(loader: torch.utils.data.DataLoader, finish: Callable, start: int,
                    stop: int) -> Iterator[tuple[np.ndarray, dict[str, Tensor]]]:
    if isinstance(loader.sampler, torch.utils.data.RandomSampler):
        raise DataError("the DataLoader shuffles (shuffle=True); rows are identified by position, so pass a "
                        "loader with shuffle=False (or the Dataset itself)")
    seen = 0
    for batch in loader:
        b = _as_batch(batch)
        rows = int(next(iter(b.values())).shape[0])
        lo, hi = max(start, seen), min(stop, seen + rows)
        if lo < hi:
            yield np.arange(lo, hi, dtype=np.int64), finish({k: v[lo - seen: hi - seen] for k, v in b.items()})
        seen += rows
        if seen >= stop:
            break


__all__ = ["ACCEPTED", "is_hf_dataset", "iter_source_batches", "num_rows", "pair_batch"]
