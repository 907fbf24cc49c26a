"""The report's pictures and texts (``pipelines/cli/html_report.py``'s ``Renderer``): every stored image
form (HWC nested lists, CHW floats, PIL images, ``{"bytes", "path"}`` dicts, flat channel-major
vectors) decodes from its inline PNG to exactly the stored pixels in (H, W, C) order, an ambiguous
layout shows nothing unless ``data.image_layout`` names it, and texts appear whole or cut at
``score.text_chars`` with the count of characters left out."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.cli.html_report import STYLE, Renderer, answer_page
from pipelines.spec.schema import RunConfig

PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def gradient(height: int = 6, width: int = 10) -> np.ndarray:
    """A (H, W, 3) uint8 picture whose red grows along x, green along y and blue is a checker: any
    transposition or channel shuffle changes it."""
    y, x = np.mgrid[0:height, 0:width]
    red, green = x * 255 // (width - 1), y * 255 // (height - 1)
    blue = np.where((x + y) % 2 == 0, 200, 17)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def config(**data: Any) -> RunConfig:
    """A default run config with the ``data`` keys set (``image_column`` defaults to ``img``)."""
    cfg = RunConfig()
    cfg.data.image_column = "img"
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def decoded(cell: str) -> np.ndarray:
    """The pixels of the one inline PNG of ``cell``."""
    found = PNG.fullmatch(cell)
    assert found is not None, cell[:200]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(found.group(1)))))


def render(cfg: RunConfig, column: dict[str, list], features: datasets.Features | None = None,
           tmp_path: Path | None = None) -> str:
    """The HTML of example 7 of a one-row data set (saved to disk and read back when ``tmp_path``)."""
    ds = datasets.Dataset.from_dict({"id": [7], **column}, features=features)
    if tmp_path is not None:
        ds.save_to_disk(str(tmp_path / "ds"))
        ds = datasets.load_from_disk(str(tmp_path / "ds"))
    return Renderer(cfg, ds)(7)


def test_hwc_uint8_nested_lists_keep_their_colours(tmp_path) -> None:
    img = gradient()
    got = decoded(render(config(), {"img": [img]}, tmp_path=tmp_path))  # CIFAR-like (H, W, 3) uint8 lists
    np.testing.assert_array_equal(got, img)
    got = decoded(render(config(), {"img": [img.tolist()]}))  # python ints (int64 in Arrow)
    np.testing.assert_array_equal(got, img)


def test_chw_floats_in_unit_range_are_scaled_by_255() -> None:
    img = gradient()
    chw = img.transpose(2, 0, 1).astype(np.float64) / 255.0
    got = decoded(render(config(), {"img": [chw.astype(np.float32).tolist()]}))
    np.testing.assert_array_equal(got, img)


def test_ambiguous_layout_shows_nothing_unless_the_config_names_it() -> None:
    img = gradient(height=3, width=3)  # (3, 3, 3): channels-last or channels-first cannot be told
    assert render(config(), {"img": [img.tolist()]}) == ""
    np.testing.assert_array_equal(decoded(render(config(image_layout="HWC"), {"img": [img.tolist()]})), img)
    chw = img.transpose(2, 0, 1)
    np.testing.assert_array_equal(decoded(render(config(image_layout="CHW"), {"img": [chw.tolist()]})), img)


@pytest.mark.parametrize("decode", [True, False])  # PIL images, or {"bytes", "path"} dicts
def test_image_feature_columns_show_the_stored_picture(decode: bool) -> None:
    img = gradient()
    features = datasets.Features({"id": datasets.Value("int64"), "img": datasets.Image(decode=decode)})
    got = decoded(render(config(), {"img": [Image.fromarray(img)]}, features))
    np.testing.assert_array_equal(got, img)
    grey = img[..., 1]
    np.testing.assert_array_equal(decoded(render(config(), {"img": [Image.fromarray(grey)]}, features)), grey)


def test_flat_channel_major_vectors_take_the_data_set_shape() -> None:
    gen = np.random.default_rng(0)
    img = gen.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    flat = img.transpose(2, 0, 1).reshape(-1)  # as pipelines/families/images.py's load_cifar2 stores CIFAR-2
    ds = datasets.Dataset(pa.table({"id": pa.array([7], pa.int64()),
                                    "image": pa.FixedSizeListArray.from_arrays(pa.array(flat), flat.size)}))
    np.testing.assert_array_equal(decoded(Renderer(config(name="cifar2", image_column="image"), ds)(7)), img)
    small = gradient(height=4, width=4)  # any data set: a square of 1 or 3 channels
    got = decoded(render(config(), {"img": [small.transpose(2, 0, 1).reshape(-1).tolist()]}))
    np.testing.assert_array_equal(got, small)
    grey = gen.integers(0, 256, size=(28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(decoded(render(config(), {"img": [grey.reshape(-1).tolist()]})), grey)


def long_text() -> str:
    """Five thousand characters: lines, a word far wider than a cell, markup and an ampersand."""
    words = " ".join(f"word{i}" for i in range(300))
    text = f"<b>bold?</b> & {'x' * 700}\nsecond line\n{words}"
    text += "." * (5000 - len(text))
    assert len(text) == 5000
    return text


def test_texts_are_shown_whole_and_wrapped() -> None:
    text = long_text()
    cfg = config()
    out = Renderer(cfg, datasets.Dataset.from_dict({"id": [7], "text": [text]}))(7)
    assert out == f'<div class="txt">{html.escape(text)}</div>'
    assert Renderer(cfg, datasets.Dataset.from_dict({"id": [7]}), {7: text})(7) == out  # a family's decoded text
    style = dict(re.findall(r"\.([\w.]+)\{([^}]*)\}", STYLE))
    assert "white-space:pre-wrap" in style["txt"] and "overflow-wrap:anywhere" in style["txt"]
    assert "overflow:auto" in style["txt"] and "max-height:24em" in style["txt"]  # long ones scroll, none is cut


def test_text_chars_cuts_with_an_ellipsis_and_the_omitted_count() -> None:
    text = long_text()
    cfg = config()
    cfg.score.text_chars = 100
    out = Renderer(cfg, datasets.Dataset.from_dict({"id": [7], "text": [text]}))(7)
    assert out == (f'<div class="txt">{html.escape(text[:100])}\u2026<span class="cut"> (4900 more characters not '
                   "shown; score.text_chars = 100)</span></div>")
    assert Renderer(cfg, datasets.Dataset.from_dict({"id": [7]}), {7: text})(7) == out
    cfg.score.text_chars = len(text)  # exactly the limit: whole, no ellipsis
    assert Renderer(cfg, datasets.Dataset.from_dict({"id": [7], "text": [text]}))(7).endswith(".</div>")


class _Answer:
    """The parts of a query answer (``tda query``) that ``answer_page`` reads."""

    scorer, kind, n_index = "trak", "exact", 2

    def as_dict(self) -> dict[str, Any]:
        cell = {"id": 1, "label": 0, "score": 0.5}
        return {"queries": [{"id": 0, "label": 1, "proponents": [cell], "opponents": [{**cell, "id": 2}]}]}


def test_answer_page_shows_colour_images_and_wide_text_cells(tmp_path, monkeypatch) -> None:
    import pipelines.cli.html_report as report
    import pipelines.run_folder as run_folder

    pics = [gradient(), gradient()[::-1], gradient()[:, ::-1]]
    data = {"train": datasets.Dataset.from_dict({"id": [1, 2], "img": [p.tolist() for p in pics[1:]],
                                                 "text": ["a proponent", "an opponent"]}),
            "query": datasets.Dataset.from_dict({"id": [0], "img": [pics[0].tolist()], "text": ["q"]})}
    cfg = config()
    monkeypatch.setattr(run_folder, "recorded_config", lambda paths: cfg)
    monkeypatch.setattr(report, "datasets_for", lambda cfg, paths: data)
    page = answer_page(None, _Answer())
    got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in PNG.findall(page)]
    assert len(got) == 3
    for image, want in zip(got, pics):
        np.testing.assert_array_equal(image, want)
    cfg.data.image_column = "missing"  # no image: the texts, in wide cells
    page = answer_page(None, _Answer())
    assert page.count('<div class="cell wide"><div class="txt">') == 3 and "<img" not in page
