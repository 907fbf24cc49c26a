"""The user family: a model by import string, checkpoints trained elsewhere, data files; its errors.
Also the seeded, stratified subsets every family draws (tda.data.loading.subset_rows)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch import nn

from pipelines.cli.main import main
from pipelines.config import load_config, parse_config
from pipelines.families import family_for
from tda.data.loading import draw_subset, subset_rows
from tda.errors import ConfigError, DataError

MODEL = '''
from torch import nn

def build(width: int = 8):
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
'''


def _project(tmp_path: Path, labels: np.ndarray | None = None, width: int = 8) -> Path:
    """A folder with model.py, two checkpoints, train/test tables and cfg.yaml (relative paths)."""
    root = tmp_path / "proj"
    (root / "code").mkdir(parents=True)
    (root / "code" / "model.py").write_text(MODEL)
    gen = np.random.default_rng(0)
    x = gen.normal(size=(90, 6)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1) if labels is None else labels
    datasets.Dataset.from_dict({"x": x[:70].tolist(), "label": y[:70].tolist()}).save_to_disk(str(root / "train"))
    datasets.Dataset.from_dict({"x": x[70:].tolist(), "label": y[70:].tolist()}).to_parquet(str(root / "q.parquet"))
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
        torch.save(net.state_dict(), root / f"m{seed}.pt")
    (root / "cfg.yaml").write_text(
        "model: {factory: code/model.py:build, options: {width: 8}, checkpoints: [m0.pt, m1.pt], check_trained: false}\n"
        "data: {train_path: train, query_path: q.parquet, image_column: x, train_size: 60, query_size: 10}\n"
        "featurize: {k: 16, shard_size: 32}\nscore: {topk: 3, show: 1}\n")
    return root


def test_user_model_runs_and_records_the_subset(tmp_path, monkeypatch) -> None:
    root = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(root / "cfg.yaml")
    assert cfg.model.family == "user" and Path(cfg.model.checkpoints[0]).is_absolute()
    data = family_for(cfg).datasets(cfg)
    assert len(data["train"]) == 60 and len(data["query"]) == 10
    ids = np.asarray(data["train"]["id"])
    assert np.all(np.diff(ids) > 0) and ids.max() < 70  # rows keep their file positions as ids
    assert main(["run", str(root / "cfg.yaml"), "--out", "run", "--quiet"]) == 0
    scores = np.load(tmp_path / "run" / "scores" / "scores.npy")
    assert scores.shape == (10, 60) and np.isfinite(scores).all()


def test_checkpoint_of_another_model_lists_the_differences(tmp_path, capsys) -> None:
    root = _project(tmp_path)
    (root / "cfg.yaml").write_text((root / "cfg.yaml").read_text().replace("width: 8", "width: 5"))
    assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and "0.weight: (8, 6) vs model (5, 6)" in err


def test_module_that_cannot_be_imported_names_the_search_path(tmp_path) -> None:
    root = _project(tmp_path)
    with pytest.raises(ConfigError, match=r"module 'nowhere' cannot be imported .*searched \['" + str(root)):
        family_for(cfg := load_config(root / "cfg.yaml", ["model.factory=nowhere:build"])).build_model(cfg)


def test_single_class_training_set_is_refused(tmp_path) -> None:
    root = _project(tmp_path, labels=np.zeros(90, dtype=np.int64))
    cfg = load_config(root / "cfg.yaml")
    with pytest.raises(DataError, match="single class"):
        family_for(cfg).datasets(cfg)


def test_missing_checkpoints_and_missing_retraining_recipe(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no file matches 'nothing-\\*.pt'"):
        parse_config({"model": {"factory": "m:f", "checkpoints": "nothing-*.pt"}})
    with pytest.raises(ConfigError, match="trains nothing itself: name your trained checkpoints"):
        parse_config({"model": {"factory": "m:f"}, "data": {"train_path": "t", "query_path": "q"}})
    cfg = load_config(_project(tmp_path) / "cfg.yaml")
    job = family_for(cfg).subset_job(cfg)  # no train.factory: the generic recipe at its defaults
    assert type(job).__name__ == "RecipeSubsetJob" and job.recipe.optimizer == "sgd" and job.recipe.epochs == 4


def test_stratified_subset_keeps_every_class_of_a_sorted_set() -> None:
    labels = np.repeat([0, 1], 500)  # stored sorted by class, as CIFAR-2 is
    rows = subset_rows(1000, 200, seed=3, labels=labels)
    assert len(rows) == 200 and np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist() == [100, 100]
    assert np.array_equal(rows, subset_rows(1000, 200, seed=3, labels=labels))  # seeded
    assert not np.array_equal(rows, subset_rows(1000, 200, seed=4, labels=labels))
    table = datasets.Dataset.from_dict({"id": np.arange(1000), "label": labels})
    sub = draw_subset(table, 10, seed=0)
    assert sorted(set(sub["label"])) == [0, 1] and len(sub) == 10
    assert draw_subset(table, 10, 0, how="first")["id"] == list(range(10))
    assert len(draw_subset(table, 5000, 0)) == 1000


def test_training_label_outside_the_classes_is_a_clear_error() -> None:
    from pipelines.families.training import train_classifier

    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 7])
    with pytest.raises(DataError, match=r"2 training label\(s\) lie outside the model's 3 classes \(e.g. \[3, 7\]\)"):
        train_classifier(lambda: nn.Sequential(nn.Linear(6, 3)), x, y, epochs=1)


def test_the_same_checkpoint_listed_twice_is_refused(tmp_path, capsys) -> None:
    root = _project(tmp_path)
    (root / "cfg.yaml").write_text((root / "cfg.yaml").read_text().replace("[m0.pt, m1.pt]", "[m0.pt, m1.pt, m0.pt]"))
    assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lists the same weights twice" in err and "m0.pt" in err and not (tmp_path / "run").exists()


def test_negative_ids_in_a_data_file_are_refused(tmp_path, capsys) -> None:
    root = _project(tmp_path)
    import pyarrow.parquet as pq

    table = pq.read_table(root / "q.parquet")
    pq.write_table(table.append_column("id", __import__("pyarrow").array(np.arange(len(table)) - 3)), root / "q.parquet")
    assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "negative ids" in err and "data.query_path" in err


def test_a_training_row_with_an_extreme_value_is_named_not_scored(tmp_path, capsys) -> None:
    """One row with a value of 1e30 would dominate the kernel and shrink every score to ~0: refused
    naming its id."""
    root = _project(tmp_path)
    train = datasets.load_from_disk(str(root / "train"))
    rows = train.to_dict()
    rows["x"][5] = [1e30] + rows["x"][5][1:]
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "train2"))
    (root / "cfg.yaml").write_text((root / "cfg.yaml").read_text().replace("train_path: train", "train_path: train2")
                                   .replace("train_size: 60", "train_size: null"))
    assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "NonFiniteFeaturesError" in err and "ids [5]" in err and "Traceback" not in err


def test_a_weak_first_epoch_of_a_recorded_run_only_warns(tmp_path, caplog) -> None:
    """The input check judges each recorded run by its last checkpoint: an untrained first save
    before a trained last one is a warning, not a refusal; a run whose last save is untrained is
    refused."""
    import tda

    root = _project(tmp_path)
    train = datasets.load_from_disk(str(root / "train")).with_format("numpy")
    x, y = torch.tensor(np.stack(train["x"])), torch.tensor(train["label"]).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    rec = tda.CheckpointRecorder(root / "ckpts", {"optimizer": "adam", "lr": 0.05, "epochs": 1, "batch_size": 70})
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    rec.save(net, optimizer=opt, step=0)  # untrained
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    rec.save(net, optimizer=opt, step=200)
    cfg = (root / "cfg.yaml").read_text().replace("checkpoints: [m0.pt, m1.pt], check_trained: false", "checkpoints: ckpts")
    (root / "cfg.yaml").write_text(cfg)
    with caplog.at_level("WARNING"):
        assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "an earlier checkpoint of a run whose last one looks trained" in caplog.text
    bad = tda.CheckpointRecorder(root / "bad", {"optimizer": "adam", "lr": 0.05})
    torch.manual_seed(1)
    bad.save(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), lr=0.05, step=1)
    (root / "cfg.yaml").write_text(cfg.replace("checkpoints: ckpts", "checkpoints: bad"))
    assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run2"), "--quiet"]) == 2


def test_airrep_on_a_users_model_takes_queries_outside_the_training_rows(tmp_path) -> None:
    """AirRep retrains your model with the generic recipe on subsets, measured on training-file rows
    the run never trains on."""
    import json

    root = _project(tmp_path)
    cfg = load_config(root / "cfg.yaml", ["data.train_size=40", "score.scorer=airrep",
                                          "score.options={queries: 16, subsets: 4, subset_epochs: 1, width: 8, "
                                          "hidden: 0, steps: 10}"])
    family = family_for(cfg)
    used = set(np.asarray(family.datasets(cfg)["train"]["id"]).tolist())
    extra = np.asarray(family.airrep_queries(cfg)["id"]).tolist()
    assert len(extra) == 16 and not used & set(extra)
    assert main(["run", str(root / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet", "--set", "data.train_size=40",
                 "--set", "score.scorer=airrep", "--set", "score.options={queries: 16, subsets: 4, subset_epochs: 1, "
                 "width: 8, hidden: 0, steps: 10}"]) == 0
    scores = np.load(tmp_path / "run" / "scores" / "scores.npy")
    assert scores.shape == (10, 40) and np.isfinite(scores).all()
    assert json.loads((tmp_path / "run" / "scorer" / "scorer.json").read_text())["scorer"] == "airrep"
