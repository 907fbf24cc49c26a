"""The README's bring-your-own example, run exactly as written: its blocks are read from the
README, then ``tda run`` and ``tda query`` run from another working directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> dict[str, str]:
    """``{file name: code}`` of every block marked ``<!-- byo:NAME -->`` in the README."""
    found = re.findall(r"<!-- byo:(\S+) -->\n```\w*\n(.*?)```", README.read_text(), flags=re.S)
    return dict(found)


def test_readme_byo_example_runs_from_another_directory(tmp_path, monkeypatch, capsys) -> None:
    blocks = readme_blocks()
    assert set(blocks) == {"mymodels.py", "prepare.py", "attribute.yaml"}
    project = tmp_path / "project"
    project.mkdir()
    for name, text in blocks.items():
        (project / name).write_text(text)
    subprocess.run([sys.executable, "prepare.py"], cwd=project, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in project.glob("ckpt-*.pt")) == ["ckpt-0.pt", "ckpt-1.pt"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(project / "attribute.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "my-mlp: 2000 training examples, 100 queries, 2 checkpoints" in out
    run = elsewhere / "runs" / "my-mlp"
    scores = np.load(run / "scores" / "scores.npy")
    assert scores.shape == (100, 2000) and np.isfinite(scores).all() and scores.std() > 0
    with np.load(run / "scores" / "topk.npz") as z:
        qid, best = int(z["query_ids"][0]), int(z["proponent_ids"][0][0])
    monkeypatch.chdir(tmp_path)  # a third working directory
    assert main(["query", "--run", str(run), "--example", str(qid), "-k", "5"]) == 0
    text = capsys.readouterr().out
    assert f"query id {qid}" in text and f"train id {best:>6}" in text
