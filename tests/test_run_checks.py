"""Results that would be meaningless are reported: a diverged model, an oversized subset, a
CIFAR-2 subset of a class-sorted file (the default draw is stratified)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines.cli.main import main
from pipelines.config import load_config
from pipelines.families import family_for

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_diverged_training_is_an_error_naming_the_learning_rate(tmp_path, capsys) -> None:
    assert main(["run", TINY, "--set", "train.lr=1000", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "NonFiniteError: training diverged" in err and "train.lr is 1000" in err and "Traceback" not in err


def test_query_size_beyond_the_split_warns_and_uses_every_row(caplog) -> None:
    cfg = load_config(TINY, ["data.query_size=5000"])  # the shipped test split has 2,000 images
    with caplog.at_level(logging.WARNING):
        query = family_for(cfg).datasets(cfg)["query"]
    assert len(query) == 2000 and "fewer than the 5000 asked for" in caplog.text


def test_default_subsets_are_stratified_and_seeded() -> None:
    cfg = load_config(ROOT / "configs" / "mnist_trak.yaml", ["data.train_size=1000", "data.query_size=100"])
    data = family_for(cfg).datasets(cfg)
    labels = np.asarray(data["train"]["label"])
    assert len(labels) == 1000 and np.bincount(labels, minlength=10).min() >= 80  # every digit, in proportion
    ids = np.asarray(data["train"]["id"])
    assert ids.max() > 1000 and np.all(np.diff(ids) > 0)  # drawn across the split, ids are split positions
    other = load_config(ROOT / "configs" / "mnist_trak.yaml", ["data.train_size=1000", "data.seed=1"])
    assert not np.array_equal(np.asarray(family_for(other).datasets(other)["train"]["id"]), ids)


CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "cifar2_cat_dog_from_jpeg_uint8.npz"


def test_cifar2_subset_of_a_class_sorted_file_holds_both_classes() -> None:
    import pytest

    if not CIFAR.is_file():
        pytest.skip(f"{CIFAR} not present")
    cfg = load_config(ROOT / "configs" / "mnist_trak.yaml", ["data.name=cifar2", "model.arch=cnn",
                                                            "model.hidden=[4]", "data.train_size=2000"])
    data = family_for(cfg).datasets(cfg)
    assert np.bincount(np.asarray(data["train"]["label"])).tolist() == [1000, 1000]
    assert sorted(set(np.asarray(data["query"]["label"]).tolist())) == [0, 1]


def test_bad_run_inputs_fail_early_naming_the_key(tmp_path, capsys) -> None:
    from pipelines.config import parse_config

    assert parse_config({"train": {"lr": "1e-3"}}).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    (tmp_path / "file").write_text("x")
    assert main(["run", TINY, "--out", str(tmp_path / "file"), "--quiet"]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(["run", TINY, "--set", "score.topk=301", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "score.topk is 301 but the training set has 300 examples" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_from_stage_redoes_that_stage_and_the_later_ones(tmp_path) -> None:
    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    times = {p: (run / p).stat().st_mtime_ns for p in ("checkpoints/checkpoints.json", "features-train/manifest.json",
                                                       "index/index.faiss", "scores/topk.npz")}
    scores = np.load(run / "scores" / "scores.npy")
    assert main(["run", TINY, "--out", str(run), "--from", "index", "--quiet"]) == 0
    after = {p: (run / p).stat().st_mtime_ns for p in times}
    assert after["checkpoints/checkpoints.json"] == times["checkpoints/checkpoints.json"]
    assert after["features-train/manifest.json"] == times["features-train/manifest.json"]
    assert after["index/index.faiss"] != times["index/index.faiss"] and after["scores/topk.npz"] != times["scores/topk.npz"]
    np.testing.assert_allclose(np.load(run / "scores" / "scores.npy"), scores, rtol=1e-5, atol=1e-7)


def test_kill_while_from_deletes_leaves_no_half_deleted_store(tmp_path, monkeypatch) -> None:
    """Killed while ``--from featurize`` deletes features-train/: the later stages' outputs are gone
    already and the store is whole or absent, so a plain rerun redoes it (the kill campaign found a
    plain rerun finishing over a store with missing shard files)."""
    import shutil

    import stores._io as io

    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    scores = np.load(run / "scores" / "scores.npy")
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name == ".features-train.removing":
            for f in sorted(Path(path).rglob("*.npy"))[::2]:  # half of its files are gone when the kill comes
                f.unlink()
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(io.shutil, "rmtree", killed)
    try:
        main(["run", TINY, "--out", str(run), "--from", "featurize", "--quiet"])
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(io.shutil, "rmtree", real)
    for later in ("scores", "index", "scorer"):  # the later stages went before the train store
        assert not (run / later).exists()
    assert not (run / "features-train").exists() and (run / ".features-train.removing").is_dir()
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and p.name != ".lock") == files
    np.testing.assert_allclose(np.load(run / "scores" / "scores.npy"), scores, rtol=1e-5, atol=1e-7)


def test_kill_during_a_config_changing_rerun_leaves_no_stale_scores(tmp_path, monkeypatch) -> None:
    """Killed after scores.npy is replaced with lambda 0.1 scores, before scores.json: a rerun of the
    original config must not reuse them (issue: it reported success with the wrong scores)."""
    import pipelines.stages.score as score_stage

    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    original = np.load(run / "scores" / "scores.npy")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(score_stage, "save_npz", killed)
    try:
        main(["run", TINY, "--out", str(run), "--set", "score.lambda_rel=0.1", "--quiet"])
    except KeyboardInterrupt:
        pass
    assert not np.allclose(np.load(run / "scores" / "scores.npy"), original)  # the new scores are in place
    monkeypatch.undo()
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    np.testing.assert_allclose(np.load(run / "scores" / "scores.npy"), original, rtol=1e-5, atol=1e-7)


def test_damaged_derived_artifacts_are_recomputed_or_refused(tmp_path, capsys) -> None:
    """Zeroed or truncated scores.npy / topk.npz / state.npz and a flipped index are detected by
    their recorded sha256: a rerun recomputes them, ``tda query`` refuses a bad index or scorer."""
    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    scores = np.load(run / "scores" / "scores.npy")
    topk = (run / "scores" / "topk.npz").read_bytes()
    (run / "scores" / "scores.npy").write_bytes((run / "scores" / "scores.npy").read_bytes()[:200])
    (run / "scores" / "topk.npz").write_bytes(topk[: len(topk) // 2])
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    np.testing.assert_allclose(np.load(run / "scores" / "scores.npy"), scores, rtol=1e-5, atol=1e-7)
    assert (run / "scores" / "topk.npz").read_bytes() == topk
    index = bytearray((run / "index" / "index.faiss").read_bytes())
    index[-5] ^= 0x80  # a flipped sign bit: FAISS still reads it
    (run / "index" / "index.faiss").write_bytes(bytes(index))
    capsys.readouterr()
    assert main(["query", "--run", str(run), "--example", "0", "-k", "3"]) == 2
    assert "does not match the sha256" in capsys.readouterr().err
    state = run / "scorer" / "state.npz"
    state.write_bytes(state.read_bytes()[:-10])
    assert main(["query", "--run", str(run), "--example", "0", "-k", "3"]) == 2
    assert "--from index" in capsys.readouterr().err
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0  # both rebuilt
    assert main(["query", "--run", str(run), "--example", "0", "-k", "3"]) == 0


def test_full_disk_is_a_clear_error_and_keeps_finished_work(tmp_path, monkeypatch, capsys) -> None:
    """ENOSPC while writing a shard, or reserving scores.npy, is a StoreError naming the fix
    (before: a bare OSError in featurize, SIGBUS with an empty stderr in the score stage)."""
    import errno
    import os

    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--only", "train", "--quiet"]) == 0
    real_replace = os.replace

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "StoreError: the disk is full writing" in err and "free space" in err and "Traceback" not in err
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full writing" in err and "scores.partial.npy" in err
    monkeypatch.undo()
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0  # finished work kept, the rest completes


def test_query_store_left_half_deleted_is_rebuilt(tmp_path) -> None:
    """A kill while features-query/ is replaced (after a query change) leaves files and no
    manifest; the rerun rebuilds the query store (before: every rerun refused the folder)."""
    import shutil

    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    scores = np.load(run / "scores" / "scores.npy")
    (run / "features-query" / "manifest.json").unlink()
    shutil.rmtree(run / "features-query" / "q")
    assert main(["run", TINY, "--out", str(run), "--set", "data.query_size=10", "--quiet"]) == 0
    np.testing.assert_allclose(np.load(run / "scores" / "scores.npy"), scores[:10], rtol=1e-5, atol=1e-7)


def test_corrupt_gzip_is_a_data_error(tmp_path, capsys) -> None:
    import shutil

    from tda.data.loading import DEMO_DATA

    shutil.copytree(DEMO_DATA / "mnist", tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["run", TINY, "--set", f"data.root={tmp_path / 'mnist'}", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "DataError" in err and "truncated or corrupt" in err and "Traceback" not in err


def test_null_or_string_labels_in_a_query_file(tmp_path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, labels in (("nulls", pa.array([None, 2, 1], pa.int64())), ("names", pa.array(["a", "b", "c"]))):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"image": [[0] * 784] * 3, "label": labels}), path)
        assert main(["run", TINY, "--set", f"data.query_path={path}", "--out", str(tmp_path / name), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "DataError" in err and "must hold integer class ids 0..9 in every row" in err and "Traceback" not in err


def test_near_chance_warning_scales_with_the_number_of_classes(tmp_path, caplog) -> None:
    """Chance is 1/C: a binary model at 0.685 is weak but learning; one at 0.55 is near chance."""
    import torch

    from pipelines.config import parse_config
    from pipelines.stages.train import check_trained

    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    cases = [("mnist", 0.30, True), ("mnist", 0.50, False), ("cifar2", 0.55, True), ("cifar2", 0.685, False)]
    for name, acc, warns in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.stages.train"):
            check_trained(parse_config({"data": {"name": name}}), path, {"train_accuracy": acc})
        assert ("training accuracy" in caplog.text) == warns, (name, acc)
        if warns:
            assert f"chance is {1 / (2 if name == 'cifar2' else 10):.3f}" in caplog.text
