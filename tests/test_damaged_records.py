"""Damaged records a command reads give a clear error or are recomputed, never a traceback:
a junk checkpoints.json is rewritten by retraining, a damaged curation / unlearning / validation
record leaves its report section out with the fix, a truncated topk.npz names the rerun, --html
into a folder is refused, and a closed pipe ends a command quietly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("damaged") / "base"
    for argv in (["curate", "--set", "curate.retrain_seeds=1"], ["unlearn", "--set", "unlearn.retrain_seeds=1"],
                 ["validate", "--set", "validate.subsets=4"]):
        assert main([argv[0], str(TINY), "--out", str(run), "--quiet", *argv[1:]]) == 0
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_a_junk_checkpoint_list_is_rebuilt(finished, tmp_path) -> None:
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "checkpoints.json").write_text("{junk")
    assert main(["run", str(TINY), "--out", str(run), "--quiet"]) == 0
    np.testing.assert_allclose(np.load(run / "scores" / "scores.npy"), np.load(finished / "scores" / "scores.npy"),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("record, junk, title", [
    ("validation/validation.json", "[1, 2", "Validation"),
    ("curation/curation.json", "[1, 2]", "Curation"),
    ("curation/ranking.parquet", "junk", "Curation"),
    ("unlearning/unlearning.json", '{"k": 3}', "Unlearning"),
])
def test_a_damaged_workflow_record_leaves_its_section_out_with_the_fix(finished, tmp_path, capsys, record, junk,
                                                                      title) -> None:
    run = _copy(finished, tmp_path)
    (run / record).write_text(junk)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert f"<h2>{title}</h2><p class='noise'>left out: its record cannot be read" in page
    assert "<h2>Queries</h2>" in page and "Traceback" not in capsys.readouterr().err


def test_a_truncated_topk_names_the_rerun(finished, tmp_path, capsys) -> None:
    run = _copy(finished, tmp_path)
    data = (run / "scores" / "topk.npz").read_bytes()
    (run / "scores" / "topk.npz").write_bytes(data[:100])
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "StoreCorruptError" in err and "topk.npz cannot be read" in err and "tda run CONFIG --out" in err


def test_html_into_a_folder_is_refused_and_a_missing_folder_is_made(finished, tmp_path, capsys) -> None:
    (tmp_path / "adir").mkdir()
    assert main(["query", "--run", str(finished), "--example", "1", "--html", str(tmp_path / "adir")]) == 2
    assert "is a folder; name a file" in capsys.readouterr().err
    assert main(["query", "--run", str(finished), "--example", "1", "--html", str(tmp_path / "new" / "a.html")]) == 0
    assert "<html" in (tmp_path / "new" / "a.html").read_text().lower()


def test_a_closed_pipe_ends_quietly(finished) -> None:
    ids = " ".join(str(i) for i in range(20))  # ~1 MB of JSON: far more than a pipe buffer holds
    cmd = f"{sys.executable} -m pipelines.cli.main query --run {finished} --example {ids} -k 300 --json | head -1"
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr


@pytest.mark.parametrize("part", ["scores", "features-train"])
def test_a_symlinked_part_of_a_run_is_refused_and_its_target_untouched(finished, tmp_path, capsys, part) -> None:
    run = _copy(finished, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(str(run / part), outside)
    (run / part).symlink_to(outside, target_is_directory=True)
    before = sorted((p.name, p.stat().st_size) for p in outside.rglob("*") if p.is_file())
    for extra in ([], ["--overwrite"], ["--set", "score.topk=5"]):
        assert main(["run", str(TINY), "--out", str(run), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert "symbolic links" in err and part in err and "Traceback" not in err
    assert sorted((p.name, p.stat().st_size) for p in outside.rglob("*") if p.is_file()) == before


def test_a_results_folder_killed_while_writing_its_first_manifest_is_resumed(tmp_path) -> None:
    """Found by the kill campaign (benchmarks/kills.py, validate-curate): a kill inside the first
    manifest's atomic write leaves only its temporary file; the next run takes the folder over.
    Anything else in a folder without a manifest is still refused."""
    import pytest

    from pipelines.ground_truth import ResultStore
    from tda.errors import ForeignStoreError

    folder = tmp_path / "removal"
    folder.mkdir()
    (folder / ".manifest.json.k3j2x9.tmp").write_text("{")
    store = ResultStore(folder, {"a": 1}, 2)
    assert store.manifest["complete"] == {} and sorted(p.name for p in folder.iterdir()) == ["manifest.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / ".manifest.json.k3j2x9.tmp").write_text("{")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ForeignStoreError, match="not empty and has no manifest"):
        ResultStore(other, {"a": 1}, 2)
    assert (other / "notes.txt").read_text() == "mine"
