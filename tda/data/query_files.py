"""Queries from Hugging Face data set files: parquet, arrow, csv, json/jsonl, or a ``save_to_disk`` folder.

Batch-scoring jobs usually take their queries from a file another job wrote. :func:`load_table`
reads one into a ``datasets.Dataset`` (locally, nothing is downloaded) and the converters turn it
into the rows a model family featurizes:

- :func:`image_queries`: an ``image`` column (flat pixel lists in channel-major order, nested
  ``(H, W)`` / ``(H, W, C)`` lists, or Hugging Face ``Image`` values: PNG/JPEG bytes) and an
  integer ``label`` column; values 0..255;
- :func:`text_queries`: ``prompt`` and ``completion`` string columns.

An integer ``id`` column is kept (it must be unique); without one, rows are numbered 0..n-1.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from tda.data.loading import example_ids
from tda.errors import DataError, ShapeError, reading

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".csv": "csv",
           ".json": "json", ".jsonl": "json"}


def non_integers(values: list[Any], count: int = 3) -> list[Any]:
    """The first ``count`` values that are not integers (nulls, floats, strings, booleans), for messages."""
    return [v for v in values if not isinstance(v, int) or isinstance(v, bool)][:count]


def load_table(path: str | Path, limit: int | None = None, key: str = "data.query_path"):
    """The file (or ``save_to_disk`` folder) at ``path`` as a ``datasets.Dataset``; first ``limit`` rows.

    Raises:
        DataError: missing path, unknown format, unreadable or empty file (the message names ``key``).
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{key} {path} does not exist; point it at a .parquet, .arrow, .csv or .json file")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{key} {path} is an empty file (0 bytes); it must hold at least one row: write it again")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{path} holds several splits {list(ds)}; point {key} at one split's folder")
        else:
            fmt = FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"{key} {path} has an unknown format {path.suffix!r}; use one of {sorted(FORMATS)} "
                                "or a datasets save_to_disk folder")
            reader = {"parquet": datasets.Dataset.from_parquet, "csv": datasets.Dataset.from_csv,
                      "json": datasets.Dataset.from_json, "arrow": datasets.Dataset.from_file}[fmt]
            ds = reader(str(path)) if fmt == "arrow" else reader(str(path), keep_in_memory=True)
    except DataError:
        raise
    except Exception as exc:  # the readers raise many kinds (ArrowInvalid, ValueError, OSError, ...)
        cause = exc
        while type(cause).__name__ == "DatasetGenerationError" and cause.__cause__ is not None:
            cause = cause.__cause__  # datasets wraps the reader's own error
        if any(s in str(cause) for s in ("corresponds to no data", "BatchSize must be greater than 0")):
            raise DataError(f"{key} {path} has no rows; it must hold at least one query") from exc
        raise reading(path, key, "check the file and its format (it must be a complete "
                      f"{path.suffix or 'save_to_disk'} file)").failure(cause) from exc
    if len(ds) == 0:
        raise DataError(f"{key} {path} has no rows; it must hold at least one query")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def _require(ds, columns: tuple[str, ...], key: str, hint: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{key} lacks column(s) {missing} (it has {ds.column_names}); {hint}")


def _decode(value: Any) -> np.ndarray:
    """One image cell as a numpy array: bytes / {"bytes": ...} (PNG, JPEG) or (nested) numbers."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(value)))
    if hasattr(value, "getdata") and hasattr(value, "size"):  # a PIL image
        return np.asarray(value)
    return np.asarray(value)


def _to_chw(img: np.ndarray, shape: tuple[int, int, int], row: int, key: str) -> np.ndarray:
    c, h, w = shape
    if img.ndim == 1 and img.size == c * h * w:
        return img
    if img.ndim == 2 and c == 1 and img.shape == (h, w):
        return img.reshape(-1)
    if img.ndim == 3 and img.shape == (h, w, c):
        return np.ascontiguousarray(img.transpose(2, 0, 1)).reshape(-1)
    if img.ndim == 3 and img.shape == (c, h, w):
        return img.reshape(-1)
    raise ShapeError(f"{key}: image of row {row} has shape {img.shape}; expected {c * h * w} values "
                     f"((H, W) = ({h}, {w}){f', {c} channels' if c > 1 else ''})")


def image_queries(ds, shape: tuple[int, int, int], classes: int, key: str = "data.query_path"):
    """``id``, ``image`` (C*H*W uint8, channel-major) and ``label`` columns from a loaded table.

    Raises:
        DataError / ShapeError: missing columns, images of the wrong size, pixel values outside
            0..255, labels outside 0..classes-1.
    """
    import datasets
    import pyarrow as pa

    _require(ds, ("image", "label"), key, "image queries need 'image' (pixels or encoded image) and 'label' columns")
    ids = example_ids(ds)
    plain = ds.cast_column("image", datasets.Image(decode=False)) if isinstance(
        ds.features.get("image"), datasets.Image) else ds
    cells = plain.with_format(None)["image"]
    images = np.stack([_to_chw(_decode(v), shape, r, key) for r, v in enumerate(cells)])
    if images.dtype.kind == "f":
        if not np.isfinite(images).all():
            rows = np.flatnonzero(~np.isfinite(images).all(axis=1))[:5].tolist()
            raise DataError(f"{key}: images contain NaN or infinite values (row(s) {rows}); fix or drop those rows "
                            "(pixels are numbers 0..255)")
        images = np.rint(images)
    if images.dtype.kind not in "iuf" or images.min() < 0 or images.max() > 255:
        raise DataError(f"{key}: pixel values must be numbers in 0..255 (got {images.dtype}, range "
                        f"{images.min()}..{images.max()}); store raw 8-bit pixels")
    labels = np.asarray(ds.with_format(None)["label"])
    if labels.dtype.kind not in "iu":  # nulls (object / float) or names (strings)
        raise DataError(f"{key}: 'label' must hold integer class ids 0..{classes - 1} in every row, got "
                        f"{labels.dtype} values such as {non_integers(labels.tolist())}; fill missing labels and map "
                        "names to ids")
    if labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"{key}: 'label' must hold integers 0..{classes - 1}, got {labels.dtype} "
                        f"{labels.min()}..{labels.max()}")
    size = int(np.prod(shape))
    return datasets.Dataset(pa.table({
        "id": pa.array(ids),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(images.astype(np.uint8).reshape(-1)), size),
        "label": pa.array(labels.astype(np.int64)),
    }))


def text_queries(ds, key: str = "data.query_path") -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``(ids, [(prompt, completion), ...])`` from a table with string ``prompt`` / ``completion`` columns."""
    _require(ds, ("prompt", "completion"), key, "text queries need 'prompt' and 'completion' string columns")
    rows = ds.with_format(None)
    pairs = list(zip(rows["prompt"], rows["completion"]))
    bad = [r for r, (p, c) in enumerate(pairs) if not isinstance(p, str) or not isinstance(c, str) or not c]
    if bad:
        raise DataError(f"{key}: rows {bad[:5]} need a string prompt and a non-empty string completion")
    return example_ids(ds), pairs


__all__ = ["FORMATS", "image_queries", "load_table", "text_queries"]
