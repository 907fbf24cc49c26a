"""One module per run-folder artifact in stores/: save and load round trips against explicit arrays,
and the errors of a missing, damaged or stale file (the messages the pipelines have always raised)."""

import json

import numpy as np
import pytest

from stores import FaissIndex, index_files, scorer_state, workflow_results
from stores import labels as label_files
from tda.errors import IndexMismatchError, StoreCorruptError, StoreError


def _flip_byte(path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# --- scorer/state.npz + scorer.json -------------------------------------------------------------------------------

STATE = {"chol": np.arange(12, dtype=np.float64).reshape(3, 4), "lr": np.array([0.5, 0.25], dtype=np.float32)}


def test_scorer_state_round_trip(tmp_path):
    folder = tmp_path / "scorer"
    assert not scorer_state.exists(folder) and not scorer_state.fitted_for(folder, "fp1")
    scorer_state.save(folder, STATE, scorer="trak", fingerprint="fp1", hyperparameters={"lambda_rel": 0.1})
    assert scorer_state.exists(folder) and scorer_state.intact(folder) and scorer_state.fitted_for(folder, "fp1")
    got = scorer_state.load(folder, "fp1")
    assert set(got) == set(STATE)
    for k, v in STATE.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    marker = json.loads(scorer_state.marker_path(folder).read_text())
    assert marker["scorer"] == "trak" and marker["hyperparameters"] == {"lambda_rel": 0.1}
    assert scorer_state.marker_field(folder, "fingerprint") == "fp1" and len(marker["sha256"]) == 64


def test_scorer_state_missing_stale_and_damaged(tmp_path):
    folder = tmp_path / "scorer"
    with pytest.raises(StoreError, match=r"state.npz is missing; run the index stage first \(`tda run CONFIG "
                                         r"--from index`\)"):
        scorer_state.load(folder, "fp1")
    scorer_state.save(folder, STATE, scorer="trak", fingerprint="fp1", hyperparameters={})
    with pytest.raises(IndexMismatchError, match=f"the scorer in {folder} was fitted for another score/index "
                                                 "configuration; refit it with `tda run CONFIG --from index`"):
        scorer_state.load(folder, "fp2")
    _flip_byte(scorer_state.state_path(folder))
    assert not scorer_state.intact(folder)
    with pytest.raises(StoreCorruptError, match=r"state.npz does not match the sha256 in scorer.json \(damaged or "
                                                r"truncated\); refit it with `tda run CONFIG --from index`"):
        scorer_state.load(folder, "fp1")


def test_scorer_state_of_an_older_tda_without_sha256_reads(tmp_path):
    folder = tmp_path / "scorer"
    scorer_state.save(folder, STATE, scorer="trak", fingerprint="fp1", hyperparameters={})
    marker = json.loads(scorer_state.marker_path(folder).read_text())
    del marker["sha256"]
    scorer_state.marker_path(folder).write_text(json.dumps(marker))
    np.testing.assert_array_equal(scorer_state.load(folder, "fp1")["chol"], STATE["chol"])


# --- index/index.faiss + index.json -------------------------------------------------------------------------------

def _index(tmp_path, fingerprint="fp1"):
    rng = np.random.default_rng(0)
    ids, vectors = np.arange(10, 20), rng.standard_normal((10, 4)).astype(np.float32)
    index = FaissIndex.build([(ids, vectors)], dim=4, meta={"fingerprint": fingerprint, "space": "plain"})
    index_files.save(tmp_path / "index", index)
    return tmp_path / "index", ids, vectors


def test_index_round_trip(tmp_path):
    assert not index_files.exists(tmp_path / "index")
    folder, ids, vectors = _index(tmp_path)
    assert index_files.exists(folder) and index_files.marker_field(folder, "fingerprint") == "fp1"
    index = index_files.load(folder, fingerprint="fp1", dim=4, n=10, space="plain")
    scores, found = index.search(vectors[:2], 3)
    exact = vectors[:2] @ vectors.T
    np.testing.assert_array_equal(found, ids[np.argsort(-exact, axis=1)[:, :3]])
    np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :3], rtol=1e-5)


def test_index_missing_stale_and_damaged(tmp_path):
    with pytest.raises(StoreError, match="index holds no finished index; build it with `tda run CONFIG --from index`"):
        index_files.load(tmp_path / "index", fingerprint="fp1", dim=4, n=10, space="plain")
    folder, _, _ = _index(tmp_path)
    with pytest.raises(IndexMismatchError, match="the FAISS index does not match: it was built for configuration "
                                                 "'fp1', this one is 'fp2'; rebuild it with `tda run CONFIG --from "
                                                 "index`"):
        index_files.load(folder, fingerprint="fp2", dim=4, n=10, space="plain")
    with pytest.raises(IndexMismatchError, match="it holds 10 training examples, the feature store 11"):
        index_files.load(folder, fingerprint="fp1", dim=4, n=11, space="plain")
    _flip_byte(index_files.index_path(folder))
    with pytest.raises(StoreCorruptError, match=r"index.faiss does not match the sha256 in .*index.json \(damaged, "
                                                r"or another run's index\)"):
        index_files.load(folder, fingerprint="fp1", dim=4, n=10, space="plain")


# --- labels/labels.npz + texts.npz + labels.json ------------------------------------------------------------------

LABELS = {"train": {0: 3, 1: 1, 2: 3}, "query": {7: 0, 9: 2}}
PREDICTIONS = {"query_pred_ids": np.array([7, 9]), "query_predicted": np.array([0, 1]),
               "query_p_predicted": np.array([0.75, 0.5])}
TEXTS = {"train": {0: "a cat", 1: "ein Hund \u00fcber", 2: ""}, "query": {7: "q", 9: "\u732b"}}
FPS = {"train": "ftrain", "query": "fquery"}


def _save_labels(folder, texts=TEXTS, limit=label_files.TEXT_BYTES_MAX):
    arrays = label_files.label_arrays(LABELS)
    label_files.save(folder, {**arrays, **PREDICTIONS}, fingerprints=FPS, class_names=["a", "b", "c", "d"],
                     texts=texts, text_bytes_max=limit)


def test_labels_round_trip(tmp_path):
    folder = tmp_path / "labels"
    assert not label_files.exists(folder)
    _save_labels(folder)
    assert label_files.exists(folder)
    arrays = label_files.load_arrays(folder, FPS)
    np.testing.assert_array_equal(arrays["train_ids"], [0, 1, 2])
    np.testing.assert_array_equal(arrays["train_labels"], [3, 1, 3])
    np.testing.assert_array_equal(arrays["query_p_predicted"], [0.75, 0.5])
    assert label_files.labels_of(arrays) == LABELS
    assert label_files.prediction_map(arrays) == {7: (0, 0.75), 9: (1, 0.5)}
    got = label_files.load(folder, FPS)
    assert got.labels == LABELS and got.names == ["a", "b", "c", "d"]
    assert {split: dict(t) for split, t in got.texts.items()} == TEXTS
    stamp = (folder / label_files.LABELS_FILE).stat().st_mtime_ns
    _save_labels(folder)  # a rerun rewrites nothing
    assert (folder / label_files.LABELS_FILE).stat().st_mtime_ns == stamp


def test_labels_damaged_stale_and_incomplete(tmp_path):
    folder = tmp_path / "labels"
    with pytest.raises(label_files.NotRecorded, match="no recorded labels"):
        label_files.load(folder, FPS)
    _save_labels(folder)
    with pytest.raises(label_files.NotRecorded, match="the labels were recorded for other features"):
        label_files.load_arrays(folder, {**FPS, "query": "another"})
    _flip_byte(folder / label_files.TEXTS_FILE, at=-1)
    with pytest.raises(label_files.NotRecorded, match="the recorded texts are missing or damaged"):
        label_files.load(folder, FPS)
    _flip_byte(folder / label_files.LABELS_FILE)
    with pytest.raises(label_files.NotRecorded, match="no recorded labels"):
        label_files.load_arrays(folder, FPS)


def test_labels_texts_too_large_and_unstorable_labels(tmp_path):
    folder = tmp_path / "labels"
    _save_labels(folder, limit=5)
    assert label_files.marker(folder)["texts"] == "too large" and not (folder / label_files.TEXTS_FILE).exists()
    with pytest.raises(label_files.NotRecorded, match="the texts are too long to be recorded"):
        label_files.load(folder, FPS)
    assert label_files.load_arrays(folder, FPS)["query_ids"].tolist() == [7, 9]  # the labels themselves still read
    _save_labels(folder, texts={"train": {}, "query": {}})
    assert label_files.marker(folder)["texts"] == "none" and label_files.load(folder, FPS).texts == {}
    assert label_files.label_arrays({"train": {0: None, 1: 2}, "query": {}}) is None
    label_files.discard(folder)
    assert not label_files.exists(folder)


# --- curation / unlearning / validation result JSON ---------------------------------------------------------------

@pytest.mark.parametrize("workflow", sorted(workflow_results.FILES))
def test_workflow_results_round_trip(tmp_path, workflow):
    assert not workflow_results.exists(tmp_path, workflow) and workflow_results.load_or_none(tmp_path, workflow) is None
    result = {"method": "loss", "scorers": {"trak": {"k": 3}}, "values": [0.5, 1.0]}
    workflow_results.save(tmp_path, workflow, result)
    assert workflow_results.path(tmp_path, workflow) == tmp_path / workflow / f"{workflow}.json"
    assert workflow_results.load(tmp_path, workflow) == result == workflow_results.load_or_none(tmp_path, workflow)
    workflow_results.path(tmp_path, workflow).write_text("{not json")
    assert workflow_results.load_or_none(tmp_path, workflow) is None
    with pytest.raises(ValueError):
        workflow_results.load(tmp_path, workflow)
