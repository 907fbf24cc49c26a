"""``report.html`` (issue 13): self-contained, written by ``tda run`` and ``tda report``; per-checkpoint
terms that sum to the stored scores; curation and unlearning sections; text escaped."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import datasets
import numpy as np

from pipelines.cli.main import main
from pipelines.config import parse_config
from pipelines.cli.html_report import Renderer, per_checkpoint_terms
from pipelines.layout import RunPaths
from pipelines.stages import load_scorer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SETS = ["--set", "featurize.shard_size=64"]


def test_run_writes_a_self_contained_report_whose_noise_terms_sum_to_the_scores(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", str(TINY), "--out", str(run), *SETS, "--quiet"]) == 0
    page = (run / "report.html").read_text()
    assert "query id 0, label 7, predicted" in page and "proponents" in page and "opponents" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 6 * 11  # 6 queries, each with itself and 10 training examples
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (28, 28)
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    from pipelines.run_folder import recorded_config

    paths = RunPaths(run)
    cfg = recorded_config(paths)
    with np.load(run / "scores" / "topk.npz") as z:
        ids, scores = z["proponent_ids"][:2, :3], z["proponent_scores"][:2, :3]
    terms = per_checkpoint_terms(cfg, paths, load_scorer(cfg, paths), [0, 1], ids)
    assert terms.shape == (2, 3, 2)
    np.testing.assert_allclose(terms.sum(axis=2), scores, rtol=1e-3, atol=1e-7)
    assert main(["unlearn", str(TINY), "--out", str(run), *SETS, "--set", "unlearn.retrain_seeds=0", "--quiet"]) == 0
    assert "<h2>Unlearning" in (run / "report.html").read_text()
    (run / "report.html").unlink()
    assert main(["report", str(run), "--queries", "2"]) == 0
    assert (run / "report.html").read_text().count("<h3>query id") == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_text_examples_are_escaped() -> None:
    cfg = parse_config({"data": {"train_size": 10}})
    ds = datasets.Dataset.from_dict({"id": [5], "text": ["<script>alert(1)</script> & more"]})
    out = Renderer(cfg, ds)(5)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&amp; more" in out
    assert Renderer(cfg, ds)(6) == ""  # an id the split lacks renders nothing
