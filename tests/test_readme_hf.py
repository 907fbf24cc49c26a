"""The Hugging Face example of docs/huggingface.md, run exactly as written: a tiny BERT fine-tuned with a real
``transformers.Trainer`` and ``CheckpointCallback``, then every command of its block. Checks: the
recorded learning rates reach the run, class names from ``ClassLabel`` reach the answers, the
curation ranking finds the rows the data set mislabelled, and the recipe retrains models like
the attributed ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("accelerate")

from test_docs import run_page_python  # noqa: E402
from test_readme_byo import run_readme_example  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "huggingface.md"


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    blocks = dict(re.findall(r"<!-- hf:(\S+) -->\n```\w*\n(.*?)```", PAGE.read_text(), flags=re.S))
    assert set(blocks) == {"prepare.py", "attribute.yaml", "commands.sh"}
    project = tmp_path_factory.mktemp("hf") / "project"
    return project, run_readme_example("hf", project, PAGE)


def test_readme_hf_commands_run_and_read_as_a_person_would(hf_run) -> None:
    project, printed = hf_run
    run = project / "runs" / "my-bert"
    manifest = json.loads((project / "ckpts" / "tda-checkpoints.json").read_text())
    entries = json.loads((run / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    assert [e["lr"] for e in entries] == [e["lr"] for e in manifest["checkpoints"]] and len(entries) == 3
    assert manifest["recipe"]["optimizer"] == "adamw" and manifest["recipe"]["schedule"] == "linear"
    answer = printed["tda query --run runs/my-bert --example 3 -k 3"]
    assert re.search(r"label (negative|positive) \(\d\)\s+predicted (negative|positive) \(\d\) p \d\.\d\d", answer)
    import datasets

    text = datasets.load_from_disk(str(project / "data" / "test"))[3]["text"]  # query id 3 is row 3 (all rows kept)
    assert text in answer
    validation = json.loads((run / "validation" / "validation.json").read_text())
    assert validation["recipe"]["reproduces"] and validation["recipe"]["correct_retrained"] > 0.9
    assert (run / "report.html").is_file() and "positive" in (run / "report.html").read_text()


def test_readme_hf_curation_finds_the_mislabelled_rows(hf_run) -> None:
    import datasets
    import pyarrow.csv as pacsv

    project, _ = hf_run
    train = datasets.load_from_disk(str(project / "data" / "train"))
    wrong = {i for i, w in enumerate(train["mislabelled"]) if w}
    ranking = pacsv.read_csv(project / "runs" / "my-bert" / "curation" / "ranking.csv").to_pydict()
    top = [int(i) for i in ranking["id"][: len(wrong)]]
    assert len(wrong & set(top)) >= 0.7 * len(wrong)  # 10 % of 400 rows mislabelled; a random ranking finds 10 %
    unlearning = json.loads((project / "runs" / "my-bert" / "unlearning" / "unlearning.json").read_text())
    assert len(unlearning["forget_ids"]) == unlearning["k"] and np.isfinite(unlearning["predicted"]["group"])


def test_the_pages_python_runs_in_the_project(hf_run) -> None:
    """The "From Python" block of docs/huggingface.md, on the folders the example made."""
    project, _ = hf_run
    namespace = run_page_python("docs/huggingface.md", project)
    assert namespace["scores"].shape == (len(namespace["test"]), len(namespace["train"]))
