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
import pytest

from pipelines.config import parse_config
from pipelines.html_report import STYLE, Renderer

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
