"""``tda query`` on stored examples: the numpy-only path imports no torch and answers as the full path does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from pipelines.cli.query import full_answer
from pipelines.layout import RunPaths
from pipelines.query.lean import NotLean, lean_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(default_tiny_run):  # the session's default tiny run (conftest), read only
    return default_tiny_run


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; which heavy modules it imported, and its output."""
    probe = (f"import sys\n{code}\n"
             "print('MODULES', {m: m in sys.modules for m in ('torch', 'datasets', 'scipy')})")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("MODULES"))
    return {"modules": eval(line.split(" ", 1)[1]), "stdout": done.stdout}


def test_lean_query_imports_no_torch(tiny_run):
    got = _modules_after(f"from pipelines.cli.main import main\nassert main(['query', '--run', {str(tiny_run)!r}, "
                         "'--example', '0', '3', '-k', '3']) == 0")
    assert got["modules"] == {"torch": False, "datasets": False, "scipy": False}
    assert "query id 0" in got["stdout"] and "query id 3" in got["stdout"]


def test_import_tda_is_lazy():
    assert not _modules_after("import tda, tda.errors, stores, pipelines.cli.main")["modules"]["torch"]
    got = _modules_after("import tda\nfrom tda import TRAKScorer\nassert tda.Attributor.__name__ == 'Attributor'")
    assert got["modules"]["torch"]  # the API loads what it needs on first use
    with pytest.raises(AttributeError, match="no attribute"):
        import tda

        tda.not_a_name


@pytest.mark.parametrize("split, examples", [("query", [5, 2, 5]), ("train", [0, 17])])
def test_lean_answer_equals_full(tiny_run, split, examples):
    paths = RunPaths(tiny_run)
    examples = list(dict.fromkeys(examples))
    lean, full = lean_answer(paths, examples, split, 4), full_answer(paths, examples, split, 4)
    assert lean.ids == full.ids == examples
    for key in ("proponent_ids", "opponent_ids"):
        np.testing.assert_array_equal(lean.top[key], full.top[key])
    for key in ("proponent_scores", "opponent_scores"):
        np.testing.assert_allclose(lean.top[key], full.top[key], rtol=1e-6, atol=0)
    assert lean.labels == full.labels and lean.qlabels == full.qlabels
    assert (lean.scorer, lean.n_index, lean.kind) == (full.scorer, full.n_index, full.kind)


def test_cli_output_equals_full_path(tiny_run, capsys, monkeypatch):
    argv = ["query", "--run", str(tiny_run), "--example", "4", "1", "-k", "3"]
    assert main(argv) == 0
    lean = capsys.readouterr().out
    monkeypatch.setattr("pipelines.cli.query.lean_answer", _refuse)
    assert main(argv) == 0
    full = capsys.readouterr().out
    assert lean.splitlines()[:-1] == full.splitlines()[:-1]  # all but the timing line
    assert "label" in lean and lean.count("train id") == 12


def _refuse(*args, **kwargs):
    raise NotLean("forced")


def test_falls_back_without_labels_or_with_a_damaged_state(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "labels")
    with pytest.raises(NotLean, match="labels"):
        lean_answer(RunPaths(run), [0], "query", 2)
    assert main(["query", "--run", str(run), "--example", "0", "-k", "2"]) == 0  # the full path answers
    assert "query id 0  label" in capsys.readouterr().out
    (run / "scorer" / "state.npz").write_bytes(b"damaged")
    assert main(["query", "--run", str(run), "--example", "0"]) == 2  # the full path's error, exit status 2
    assert "StoreCorruptError" in capsys.readouterr().err


def test_labels_are_keyed_by_the_stores(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    marker = run / "labels" / "labels.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "query": "another"}))
    with pytest.raises(NotLean, match="other features"):
        lean_answer(RunPaths(run), [0], "query", 2)


def test_lean_path_keeps_the_query_errors(tiny_run, capsys):
    assert main(["query", "--run", str(tiny_run), "--example", "99999"]) == 2
    assert "not in the query split" in capsys.readouterr().err
    assert main(["query", "--run", str(tiny_run), "--example", "1", "-k", "0"]) == 2
    assert "-k must be between 1" in capsys.readouterr().err


def test_query_prints_predictions_and_writes_json_and_html(tiny_run, tmp_path, capsys):
    """Predicted labels (recorded by `tda run` for the lean path) in the text, --json and --html."""
    import json

    from pipelines.families import family_for
    from pipelines.layout import RunPaths
    from pipelines.run_folder import recorded_config

    paths = RunPaths(tiny_run)
    preds = family_for(recorded_config(paths)).example_predictions(recorded_config(paths), paths, "query")
    assert main(["query", "--run", str(tiny_run), "--example", "0", "1", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert f"predicted {preds['predicted'][0]} (p {preds['p_predicted'][0]:.2f})" in text
    page = tmp_path / "answer.html"
    assert main(["query", "--run", str(tiny_run), "--example", "1", "-k", "3", "--json", "--html", str(page)]) == 0
    got = json.loads(capsys.readouterr().out)
    (q,) = got["queries"]
    assert q["id"] == 1 and q["predicted"] == int(preds["predicted"][1]) and len(q["proponents"]) == 3
    assert q["p_predicted"] == pytest.approx(float(preds["p_predicted"][1]), rel=1e-6)
    scores = np.load(tiny_run / "scores" / "scores.npy")[1]
    assert [e["id"] for e in q["proponents"]] == np.argsort(-scores, kind="stable")[:3].tolist()
    assert all(e["score"] > 0 for e in q["proponents"]) and q["opponents"][0]["score"] < 0
    html = page.read_text()
    assert html.count("<img src=\"data:image/png;base64,") == 1 + 3 + 3 and "predicted" in html


def test_list_of_a_demo_run_without_names_or_texts(tiny_run, capsys):
    """``--list``: the ids of ``scores/topk.npz`` with their labels and predictions; no names, no texts."""
    from pipelines.query.lean import load_labels, load_predictions

    with np.load(tiny_run / "scores" / "topk.npz") as z:
        query_ids, train_ids = z["query_ids"].tolist(), z["train_ids"].tolist()
    labels, preds = load_labels(RunPaths(tiny_run)), load_predictions(RunPaths(tiny_run))
    assert main(["query", "--run", str(tiny_run), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["id", "label", "predicted"]
    assert [ln.split()[:2] for ln in lines[2:]] == [[str(q), str(labels["query"][q])] for q in query_ids]
    assert [ln.split(None, 2)[2] for ln in lines[2:]] == [f"{preds[q][0]} p {preds[q][1]:.2f}" for q in query_ids]
    assert main(["query", "--run", str(tiny_run), "--list", "--split", "train", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"id": i, "label": labels["train"][i], "label_name": None} for i in train_ids]


@pytest.mark.parametrize("options", ["{normalize: true}", "{q_weight: false}"])
def test_lean_answer_of_a_trak_variant_equals_its_dense_scores(tmp_path, options):
    """``score.options`` of TRAK shape the query side too: the lean path's top-k is the dense
    ``scores.npy`` row the full scorer wrote (reference: argsort of that matrix)."""
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(run), "--quiet",
                 "--set", f"score.options={options}"]) == 0
    paths = RunPaths(run)
    dense = np.load(run / "scores" / "scores.npy")
    query_ids = np.load(run / "scores" / "topk.npz")["query_ids"]
    lean = lean_answer(paths, [int(query_ids[0]), int(query_ids[3])], "query", 5)
    for row, qrow in enumerate((0, 3)):
        want = np.sort(dense[qrow])[::-1][:5]
        np.testing.assert_allclose(lean.top["proponent_scores"][row], want, rtol=1e-4, atol=1e-7)
