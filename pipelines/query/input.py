"""``tda query --run DIR --input X``: attribute a new input from the command line.

``X`` is a rows file (``.parquet``, ``.arrow``, ``.csv``, ``.json``/``.jsonl`` or a ``save_to_disk``
folder, with the query data's columns), an image file (``.png``, ``.jpg``, ...: read with PIL into
the image column, in the stored image's mode and shape) or, otherwise, a text (into the text
column). The rows go through the run's collate and featurizer under every checkpoint, exactly as
``tda serve``'s ``POST /query/input`` does (:meth:`pipelines.query.state.Service.new_inputs`).

A classifier's measured output needs a label: ``--label`` (an id or a class name); without it
each input is explained for the class the model predicts (:meth:`Service.new_inputs` completes
the rows: missing columns other than the label are left empty), and the answer says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tda.errors import DataError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _flat_image_row(path: Path, stored: np.ndarray, column: str) -> dict[str, Any]:
    """A picture for a run whose images are stored flat (one row of ``n`` values, e.g. MNIST's 784):
    taken only as a grayscale picture of ``n`` pixels, read row by row (how such rows are made)."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"))
    if pixels.size != stored.size:
        raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; the run's images are stored flat, "
                        f"{stored.size} values per row: give a grayscale picture of {stored.size} pixels (e.g. "
                        f"{_side(stored.size)}) or a rows file of flat rows")
    return {column: pixels.reshape(-1).astype(stored.dtype if stored.dtype.kind in "iuf" else np.uint8).tolist()}


def _side(n: int) -> str:
    root = int(round(n ** 0.5))
    return f"{root}x{root}" if root * root == n else f"{n}x1"


def _image_row(path: Path, template: Any, column: str) -> dict[str, Any]:
    from PIL import Image

    stored = np.asarray(template[0][column])
    if stored.ndim == 1:
        return _flat_image_row(path, stored, column)
    if stored.ndim not in (2, 3):
        raise DataError(f"the run's image column {column!r} holds {stored.ndim}-d values; give a rows file instead "
                        "of a picture")
    img = Image.open(path)
    img = img.convert("L") if stored.ndim == 2 else img.convert("RGB")
    pixels = np.asarray(img)
    want = stored.shape if stored.ndim != 3 or stored.shape[-1] in (1, 3, 4) else stored.shape[1:] + stored.shape[:1]
    if pixels.shape[:2] != tuple(want[:2]):
        raise DataError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; the run's images are {want[1]}x{want[0]} "
                        "(resize it first)")
    if stored.ndim == 3 and stored.shape[0] in (1, 3) and stored.shape[-1] not in (1, 3, 4):  # stored CHW
        pixels = pixels.transpose(2, 0, 1)
    return {column: pixels.astype(stored.dtype if stored.dtype.kind in "iuf" else np.uint8).tolist()}


def input_rows(value: str, cfg: Any, template: Any) -> list[dict[str, Any]]:
    """Rows for ``--input value`` (the columns it gives; the service completes the others)."""
    from tda.data.query_files import load_table

    d, path = cfg.data, Path(value)
    columns = [c for c in template.column_names if c != "id"]
    if path.exists() and (path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES):
        table = load_table(str(path), None, "--input")
        return [{k: v for k, v in row.items() if k != "id"} for row in table.to_list()]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"--input {value}: no such image file")
        image = d.image_column if d.image_column in columns else "x"
        if image not in columns:
            raise DataError(f"the run's query data has no image column ({columns}); give a rows file or a text")
        return [_image_row(path, template, image)]
    if d.text_column not in columns:
        raise DataError(f"--input {value!r} is not a file, and the run's query data has no text column "
                        f"{d.text_column!r} ({columns}); give a rows file or an image")
    return [{d.text_column: value}]


__all__ = ["IMAGE_SUFFIXES", "input_rows"]
