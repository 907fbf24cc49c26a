"""``report.html`` in a real browser (issue 13): headless Chromium loads the report of a tiny run,
a probe script counts the images that decoded and the query rows and grid cells that exist, and a
training text holding ``<script>`` stays text (it neither runs nor becomes an element). Skipped,
with the reason, when no Chromium can be found (``.ci/run`` installs Debian's ``chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from pipelines.config import parse_config
from pipelines.cli.html_report import STYLE, Renderer

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
BROWSER = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"no headless browser found (looked for {', '.join(BROWSERS)}); "
                                                        "install Debian's chromium package to run this test")

#: sets data-* attributes on <body> once every image has loaded or failed
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images), b = document.body;
  b.dataset.images = imgs.length;
  b.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  b.dataset.rows = document.querySelectorAll('h3').length;
  b.dataset.cells = document.querySelectorAll('.cell').length;
  b.dataset.scripts = document.scripts.length;
});</script>"""


def dump_dom(page: Path) -> str:
    """The DOM after load, as headless Chromium serialises it."""
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def body_data(dom: str) -> dict[str, int]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:500]
    return {k: int(v) for k, v in re.findall(r'data-(\w+)="(\d+)"', body.group(1))}


def test_every_image_of_the_report_decodes_and_the_rows_exist(default_tiny_run, tmp_path) -> None:
    page = (default_tiny_run / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    got = body_data(dump_dom(probed))
    rows = page.count("<h3>query id")
    assert rows == 6 and got["rows"] == rows
    assert got["images"] == page.count("<img ") >= rows * 11  # each query and its top training examples
    assert got["decoded"] == got["images"]  # every inline PNG decoded
    assert got["cells"] == page.count('class="cell"') + page.count("class='cell'")
    assert got["scripts"] == 1  # the probe only: the report itself runs nothing


def test_a_training_text_holding_a_script_stays_text(tmp_path) -> None:
    cfg = parse_config({"data": {"train_size": 10}})
    evil = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\"> & more"
    cell = Renderer(cfg, datasets.Dataset.from_dict({"id": [5], "text": [evil]}))(5)
    page = tmp_path / "text.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>safe</title><style>{STYLE}</style>"
                    f"</head><body>{cell}{PROBE}</body></html>", encoding="utf-8")
    dom = dump_dom(page)
    assert "<title>safe</title>" in dom  # neither the script nor the onerror handler ran
    got = body_data(dom)
    assert got["images"] == 0 and got["scripts"] == 1  # no element was made from the text
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text


#: writes each image's size and RGBA pixels (drawn on a canvas) on it, and whether any text box overflows sideways
PIXELS = """<script>window.addEventListener('load', () => {
  for (const img of document.images) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    img.dataset.size = img.naturalHeight + 'x' + img.naturalWidth;
    img.dataset.rgba = Array.from(g.getImageData(0, 0, c.width, c.height).data).join(',');
  }
  const boxes = Array.from(document.querySelectorAll('.txt'));
  document.body.dataset.texts = boxes.length;
  document.body.dataset.overflowing = boxes.filter(t => t.scrollWidth > t.clientWidth + 1).length;
});</script>"""


def colour_picture(height: int = 12, width: int = 20) -> np.ndarray:
    """(H, W, 3) uint8: red grows along x, green along y, blue a checker (stripes if transposed)."""
    y, x = np.mgrid[0:height, 0:width]
    blue = np.where((x + y) % 2 == 0, 230, 10)
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), blue], axis=-1).astype(np.uint8)


def test_colour_images_show_their_stored_pixels_in_the_browser(tmp_path) -> None:
    cfg = parse_config({"data": {"train_size": 10}})
    pic = colour_picture()
    hwc = datasets.Dataset.from_dict({"id": [1], "image": [pic]})  # a user's CIFAR-like save_to_disk folder
    hwc.save_to_disk(str(tmp_path / "hwc"))
    chw = datasets.Dataset.from_dict({"id": [2], "image": [(pic.transpose(2, 0, 1) / 255.0).tolist()]})
    pil = datasets.Dataset.from_dict({"id": [3], "image": [Image.fromarray(pic)]},
                                     features=datasets.Features({"id": datasets.Value("int64"),
                                                                 "image": datasets.Image()}))
    text = ("a long line " * 300 + "\n" + "unbroken" * 100).strip()
    cells = [Renderer(cfg, datasets.load_from_disk(str(tmp_path / "hwc")))(1), Renderer(cfg, chw)(2),
             Renderer(cfg, pil)(3), Renderer(cfg, datasets.Dataset.from_dict({"id": [4], "text": [text]}))(4)]
    grid = "".join(f'<div class="cell{" wide" if i == 3 else ""}">{c}</div>' for i, c in enumerate(cells))
    page = tmp_path / "colour.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>colour</title><style>{STYLE}</style>"
                    f"</head><body><div class='grid'>{grid}</div>{PIXELS}</body></html>", encoding="utf-8")
    dom = dump_dom(page)
    images = re.findall(r'<img [^>]*data-size="(\d+)x(\d+)"[^>]*data-rgba="([\d,]+)"', dom)
    assert len(images) == 3, dom[:1000]
    for height, width, rgba in images:
        assert (int(height), int(width)) == pic.shape[:2]
        got = np.array(rgba.split(","), dtype=np.uint8).reshape(pic.shape[0], pic.shape[1], 4)
        np.testing.assert_array_equal(got[..., :3], pic)  # the stored colours, not channel stripes
        assert (got[..., 3] == 255).all()
    assert body_data(dom)["texts"] == 1 and body_data(dom)["overflowing"] == 0  # wrapped, nothing hidden sideways
    assert text.replace("\n", "") in dom.replace("\n", "")  # the whole text is there
