"""One module per run-folder artifact in stores/: save and load round trips against explicit arrays,
and the errors of a missing, damaged or stale file (the messages the pipelines have always raised)."""

import json

import numpy as np
import pytest

from stores import FaissIndex, index_files, scorer_state, scores_files, workflow_results
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


# --- scores/topk.npz + scores.npy + influential.json + scores.json ------------------------------------------------

TOP = {"query_ids": np.array([7, 9]), "train_ids": np.arange(4),
       "proponent_ids": np.array([[2, 0], [1, 3]]), "proponent_scores": np.array([[0.5, 0.25], [0.75, 0.125]]),
       "opponent_ids": np.array([[1, 3], [0, 2]]), "opponent_scores": np.array([[-0.5, -0.25], [-0.75, -0.125]])}
DENSE = np.arange(8, dtype=np.float32).reshape(2, 4)


def _save_scores(folder, dense=True, fingerprint="fp1"):
    scores_files.save_topk(folder, **TOP)
    if dense:
        writer = scores_files.DenseWriter(folder, DENSE.shape, {"fingerprint": fingerprint, "block_rows": 3})
        col = writer.write(writer.done, DENSE[:, :3])
        writer.finish(writer.write(col, DENSE[:, 3:]))
    scores_files.save_marker(folder, fingerprint=fingerprint, n_query=2, n_train=4, dense=dense, finished="now")


def test_scores_round_trip(tmp_path):
    folder = tmp_path / "scores"
    assert not scores_files.exists(folder) and not scores_files.current(folder, "fp1", dense=True)
    _save_scores(folder)
    assert scores_files.exists(folder) and scores_files.current(folder, "fp1", dense=True)
    assert not scores_files.current(folder, "fp2", dense=True) and not scores_files.current(folder, "fp1", dense=False)
    top = scores_files.load_topk(folder, "fp1")
    assert set(top) == set(TOP)
    for key, value in TOP.items():
        np.testing.assert_array_equal(top[key], value)
    scores, query_ids, train_ids = scores_files.load_dense(folder)
    np.testing.assert_array_equal(scores, DENSE)
    assert scores.dtype == np.float32 and query_ids.tolist() == [7, 9] and train_ids.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(scores_files.load_dense(folder, mmap=True)[0], DENSE)
    assert not (folder / scores_files.PARTIAL_FILE).exists() and not (folder / scores_files.PROGRESS_FILE).exists()
    marker = json.loads(scores_files.marker_path(folder).read_text())
    assert set(marker["sha256"]) == {"topk", "scores"} and (marker["n_query"], marker["n_train"]) == (2, 4)
    counts = {"trak": {"proponents": np.array([1, 2]), "opponents": np.array([], dtype=np.int64), "k": 2,
                       "fraction": 0.5}}
    scores_files.save_influential(folder, counts)
    got = scores_files.load_influential(folder)["trak"]
    assert got["proponents"].tolist() == [1, 2] and got["opponents"].dtype == np.int64 and got["k"] == 2


def test_dense_scores_resume_where_a_killed_pass_stopped(tmp_path):
    folder, key = tmp_path / "scores", {"fingerprint": "fp1", "block_rows": 3}
    first = scores_files.DenseWriter(folder, DENSE.shape, key)
    assert first.done == 0
    first.write(0, DENSE[:, :3])
    del first  # killed here
    again = scores_files.DenseWriter(folder, DENSE.shape, key)
    assert again.done == 3
    again.finish(again.write(3, DENSE[:, 3:]))
    np.testing.assert_array_equal(np.load(scores_files.scores_path(folder)), DENSE)
    other = scores_files.DenseWriter(folder, DENSE.shape, {**key, "block_rows": 2})  # another pass: from the start
    assert other.done == 0
    with pytest.raises(StoreError, match="scored 2 of 4 training examples; delete .*scores and rerun"):
        other.finish(other.write(0, DENSE[:, :2]))


def test_scores_missing_stale_and_damaged(tmp_path):
    folder = tmp_path / "run" / "scores"
    with pytest.raises(StoreError, match=r"holds no finished scores \(scores.json is missing\)"):
        scores_files.load_topk(folder)
    _save_scores(folder, dense=False)
    with pytest.raises(IndexMismatchError, match="were made for another score configuration .*`tda run CONFIG --from "
                                                 "score`"):
        scores_files.load_topk(folder, "fp2")
    with pytest.raises(StoreError, match=r"scores.npy is missing: the run was scored with score.dense: false"):
        scores_files.load_dense(folder)
    data = scores_files.topk_path(folder).read_bytes()
    scores_files.topk_path(folder).write_bytes(data[:100])
    fix = f"rerun `tda run CONFIG --out {tmp_path / 'run'}`: it recomputes damaged scores"
    with pytest.raises(StoreCorruptError, match=r"topk.npz cannot be read \(BadZipFile: .*\); " + fix):
        scores_files.load_topk(folder)
    scores_files.save_topk(folder, **{**TOP, "proponent_scores": TOP["proponent_scores"] * 2})  # another run's
    with pytest.raises(StoreCorruptError, match=r"topk.npz cannot be read \(it does not match the sha256 in "
                                                r"scores.json: damaged, or another run's\); " + fix):
        scores_files.load_topk(folder)


def test_foreign_or_inconsistent_score_files_are_refused(tmp_path):
    folder = tmp_path / "run" / "scores"
    _save_scores(folder)
    scores_files.save_topk(folder, **{**TOP, "proponent_ids": TOP["proponent_ids"][:1]})
    marker = json.loads(scores_files.marker_path(folder).read_text())
    del marker["sha256"]  # an older marker: the shapes are still checked
    scores_files.marker_path(folder).write_text(json.dumps(marker))
    with pytest.raises(StoreCorruptError, match=r"proponent/opponent arrays are not all \(2, k\)"):
        scores_files.load_topk(folder)
    from stores._io import save_npz

    save_npz(scores_files.topk_path(folder), ids=np.arange(3))
    with pytest.raises(StoreCorruptError, match="lacks .*'query_ids'.*: not a tda top-k file"):
        scores_files.load_topk(folder)
    scores_files.save_topk(folder, **TOP)
    np.save(scores_files.scores_path(folder), DENSE[:, :3])
    with pytest.raises(StoreCorruptError, match=r"scores.npy cannot be read \(its shape is \(2, 3\), topk.npz holds "
                                                r"2 queries x 4 training examples\)"):
        scores_files.load_dense(folder)
    scores_files.save_topk(folder, **{**TOP, "train_ids": np.arange(5)})
    with pytest.raises(StoreCorruptError, match="holds 2 queries x 5 training examples, scores.json records 2 x 4"):
        scores_files.load_topk(folder)
    scores_files.influential_path(folder).write_text("{not json")
    with pytest.raises(StoreCorruptError, match="influential.json cannot be read"):
        scores_files.load_influential(folder)
