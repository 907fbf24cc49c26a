"""``tda query --input PICTURE``: a picture becomes a row of the run's image column exactly as the
stored rows are laid out (reference: the picture's pixels, read explicitly), or a DataError saying
what picture fits."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from pipelines.query.input import input_rows
from pipelines.spec.schema import RunConfig
from tda.errors import DataError


def _picture(tmp_path, shape, mode="L"):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"p{'x'.join(map(str, shape))}.png"
    Image.fromarray(pixels, mode=mode).save(path)
    return path, pixels


def _template(value) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"id": [0], "x": [value], "y": [1]})


def test_a_picture_for_flat_stored_images_is_read_row_by_row(tmp_path):
    path, pixels = _picture(tmp_path, (28, 28))
    (row,) = input_rows(str(path), RunConfig(), _template(np.zeros(784, np.float32)))
    np.testing.assert_array_equal(np.asarray(row["x"], np.float32), pixels.reshape(-1).astype(np.float32))


def test_a_picture_of_another_size_names_the_one_that_fits(tmp_path):
    path, _ = _picture(tmp_path, (30, 30))
    with pytest.raises(DataError, match="stored flat, 784 values per row: give a grayscale picture of 784 pixels"):
        input_rows(str(path), RunConfig(), _template(np.zeros(784, np.float32)))


def test_a_picture_for_hw_stored_images_keeps_its_shape(tmp_path):
    path, pixels = _picture(tmp_path, (8, 6))
    (row,) = input_rows(str(path), RunConfig(), _template(np.zeros((8, 6), np.uint8)))
    np.testing.assert_array_equal(np.asarray(row["x"]), pixels)
    with pytest.raises(DataError, match="resize it first"):
        input_rows(str(path), RunConfig(), _template(np.zeros((6, 8), np.uint8)))
