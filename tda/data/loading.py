"""Data: MNIST from idx files as a Hugging Face ``datasets.Dataset``, and batching.

Any ``datasets.Dataset`` plugs in the same way: batches are dicts of tensors produced by a
``collate`` function from the dataset's columns, and every row has an integer example id (the
``id`` column when present, else its position).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from tda.errors import DataError, DTypeError, DuplicateIdError, reading

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: Data shipped with tda: ``mnist/`` (the first 10,000 training and 2,000 test images of MNIST, idx
#: files) and ``tinyshakespeare.txt.gz`` (the 1.1 MB corpus), for demos that run anywhere.
DEMO_DATA = Path(__file__).parent / "demo_data"
_IDX_FIX = "copy it again (MNIST: the four idx files, gzipped or not)"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

Collate = Callable[[Mapping[str, object]], dict[str, Tensor]]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian header (magic, dims), then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with reading(path, "", f"the file is truncated or corrupt: {_IDX_FIX}"):
        with opener(path, "rb") as fh:
            raw = fh.read()
    if not raw:
        raise DataError(f"{path} is empty; {_IDX_FIX}")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number); {_IDX_FIX}")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is truncated: its header needs {offset} bytes, found {len(raw)}; {_IDX_FIX}")
    dims = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(
            f"{path} is truncated or has trailing bytes: header says {dims} "
            f"({expected} data bytes), found {len(raw) - offset}; {_IDX_FIX}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"MNIST file {stem}(.gz) not found in {root}; set data.root in the config (or the "
        "root argument) to the folder holding the four idx files"
    )


def load_mnist(root: str | Path | None = None, split: str = "train", limit: int | None = None):
    """MNIST as a ``datasets.Dataset`` with columns ``id`` (int64), ``image`` (784 uint8), ``label``.

    Args:
        root: folder with the idx files (gzipped or not); ``None``: the 10,000 / 2,000 image
            subset shipped with tda (:data:`DEMO_DATA`).
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        limit: keep the first ``limit`` rows.
    """
    import datasets
    import pyarrow as pa

    if split not in MNIST_FILES:
        raise DataError(f"MNIST split {split!r} is unknown; use 'train' or 'test'")
    root = Path(root) if root is not None else DEMO_DATA / "mnist"
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist; set data.root to the idx files' folder")
    files = [_find(root, stem) for stem in MNIST_FILES[split]]
    images, labels = (read_idx(f) for f in files)
    for file, array, ndim, what in ((files[0], images, 3, "images (n, 28, 28)"), (files[1], labels, 1, "labels (n,)")):
        if array.ndim != ndim:
            raise DataError(f"{file} holds an array of {array.ndim} dimension(s) {array.shape}, not {what}: a file "
                            f"of another kind under this name; {_IDX_FIX}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels in {root}; the files "
                        "come from different sets: set data.root to a folder of the four files of one MNIST copy")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    flat = pa.array(np.ascontiguousarray(images.reshape(len(images), -1)).reshape(-1))
    table = pa.table({
        "id": pa.array(np.arange(len(images), dtype=np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(flat, images.shape[1] * images.shape[2]),
        "label": pa.array(labels.astype(np.int64)),
    })
    return datasets.Dataset(table)


def mnist_collate(rows: Mapping[str, object]) -> dict[str, Tensor]:
    """Batch of MNIST rows -> ``{"x": (B, 784) float32 normalised, "y": (B,) int64}``."""
    x = torch.from_numpy(np.array(rows["image"], dtype=np.float32)) / 255.0
    return {"x": (x - MNIST_MEAN) / MNIST_STD, "y": torch.from_numpy(np.array(rows["label"], dtype=np.int64))}


def example_ids(dataset) -> np.ndarray:
    """Integer ids of every row: the ``id`` column if present, else positions."""
    if "id" in dataset.column_names:
        raw = dataset.with_format("arrow")["id"].to_numpy(zero_copy_only=False)
        if raw.dtype.kind not in "iu":
            raise DTypeError(f"the data set's 'id' column has dtype {raw.dtype}; ids must be integers (cast the "
                             "column, e.g. dataset.cast_column('id', datasets.Value('int64')))")
        ids = raw.astype(np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            raise DuplicateIdError(
                f"the data set's 'id' column has duplicates (e.g. {uniq[counts > 1][:5].tolist()}); ids must be "
                "unique: give every row its own integer id, or drop the 'id' column to number rows by position"
            )
        return ids
    return np.arange(len(dataset), dtype=np.int64)


def iter_batches(
    dataset, collate: Collate, batch_size: int = 256, start: int = 0, stop: int | None = None
) -> Iterator[tuple[np.ndarray, dict[str, Tensor]]]:
    """Yield ``(ids, batch)`` over rows ``[start, stop)`` of a ``datasets.Dataset`` (or of tensors,
    a PyTorch ``Dataset`` or ``DataLoader``: :mod:`tda.data.sources`, ids by position)."""
    from tda.data.sources import is_hf_dataset, iter_source_batches, num_rows

    n = num_rows(dataset)
    if n == 0:
        raise DataError("the data set is empty (0 rows); nothing to featurize: pass at least one example "
                        "(check the split, its size limit and any filtering)")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if not is_hf_dataset(dataset):
        yield from iter_source_batches(dataset, collate, batch_size, start, stop)
        return
    if collate is None:
        raise DataError("a datasets.Dataset needs a collate turning its rows (a dict of numpy columns) into the "
                        "tensors the task reads; pass collate=... (tensors, a PyTorch Dataset or DataLoader need none)")
    stop = n if stop is None else min(stop, n)
    ids = example_ids(dataset)
    view = dataset.with_format("arrow")
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        yield ids[lo:hi], collate(arrow_columns(view[lo:hi]))


def arrow_columns(table) -> dict[str, np.ndarray]:
    """Columns of an Arrow table as numpy arrays; fixed-size lists become 2-D arrays."""
    import pyarrow as pa

    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        elif pa.types.is_primitive(col.type):
            out[name] = col.to_numpy(zero_copy_only=False)
        else:
            out[name] = np.asarray(col.to_pylist(), dtype=object)
    return out


def as_dataset(data) -> object:
    """Accept a ``datasets.Dataset`` or a dict of equal-length arrays and return a Dataset."""
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, Mapping):
        cols = {k: np.asarray(v) for k, v in data.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"columns have different lengths: {lengths}")
        return datasets.Dataset.from_dict({k: list(v) if v.ndim > 1 else v for k, v in cols.items()})
    raise DataError(f"expected a datasets.Dataset or a dict of arrays, got {type(data).__name__}")


def subset_rows(n_rows: int, size: int | None, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted row positions of a seeded random subset of ``size`` of ``n_rows`` rows.

    With ``labels``, the subset is stratified: each class keeps its share of the rows (largest
    remainders get the rounding), so a data set stored sorted by class still gives every class.
    ``size`` of ``None`` or at least ``n_rows`` keeps every row (in order).

    Args:
        n_rows: rows of the split.
        size: rows wanted.
        seed: the subset's seed (recorded in the run's config).
        labels: (n_rows,) class labels, or ``None`` for a plain random subset.

    Returns:
        (size,) int64 row positions, increasing.
    """
    if size is None or size >= n_rows:
        return np.arange(n_rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_rows, size=size, replace=False)).astype(np.int64)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * size / n_rows
    take = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - take), kind="stable")
    take[order[: size - int(take.sum())]] += 1
    rows = [rng.choice(np.flatnonzero(labels == c), size=int(t), replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(rows)).astype(np.int64)


def draw_subset(dataset, size: int | None, seed: int, label_column: str | None = "label", how: str = "random"):
    """``size`` rows of ``dataset``: seeded and stratified by ``label_column`` when it exists
    (:func:`subset_rows`), or the first ``size`` with ``how="first"``. Row ids are kept."""
    n = len(dataset)
    if size is None or size >= n:
        return dataset
    if how == "first":
        rows = np.arange(size)
    else:
        labels = None
        if label_column and label_column in dataset.column_names:
            labels = np.asarray(dataset.with_format("numpy")[label_column])
        rows = subset_rows(n, size, seed, labels)
    import datasets

    return datasets.Dataset(dataset.with_format("arrow")[rows], info=dataset.info.copy())  # a table of its own rows
