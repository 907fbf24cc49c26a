"""A run is bound once per command (pipelines.methods.bound): inside one command the same
configuration and folder give the same BoundRun and the fitted scorer is read once (again after a
refit); outside a command every call binds anew, as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipelines.cli.main import main
from pipelines.config import parse_config
from pipelines.families import base
from pipelines.families.classifier import ClassifierFamily
from pipelines.layout import RunPaths
from pipelines.methods.bound import bind, one_command
from pipelines.run_folder import recorded_config
from pipelines.stages import load_scorer, scorer_for
from stores import scorer_state
from tda.data.loading import example_ids

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_one_binding_and_one_read_per_command(default_tiny_run, tmp_path, monkeypatch) -> None:
    run = tmp_path / "tiny"
    shutil.copytree(default_tiny_run, run)
    paths = RunPaths(run)
    cfg = recorded_config(paths)
    reads = []
    real = scorer_state.load
    monkeypatch.setattr(scorer_state, "load", lambda *a, **k: reads.append(1) or real(*a, **k))
    with one_command():
        bound = bind(cfg, paths)
        assert bind(recorded_config(paths), paths) is bound and bind(cfg) is not bound  # same content, same run
        assert bound.kind == "gradients" and bound.family.name == cfg.model.family
        first = load_scorer(cfg, paths)
        assert load_scorer(cfg, paths) is first and len(reads) == 1
        assert scorer_for(cfg, paths) is not scorer_for(cfg, paths)  # unfitted ones are never shared
        state = first.state_dict()
        refit = {k: v * 2 if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}
        scorer_state.save(paths.scorer, refit, scorer=first.name, fingerprint=scorer_state.marker_field(
            paths.scorer, "fingerprint"), hyperparameters={})  # a refit within the command: read anew
        again = load_scorer(cfg, paths)
        assert again is not first and len(reads) == 2
    outside = [load_scorer(cfg, paths), load_scorer(cfg, paths)]
    assert outside[0] is not outside[1] and len(reads) == 4 and bind(cfg, paths) is not bind(cfg, paths)


class _CountingFamily(ClassifierFamily):
    """The classifier family, counting its data-set loads; its data sets also read a file of the run
    folder (``extra.npy``), as the diffusion family reads its generated queries."""

    name = "counting-test"
    loads = 0

    def data_files(self, cfg, paths):
        return [] if paths is None else [paths.root / "extra.npy"]

    def datasets(self, cfg, paths=None):
        type(self).loads += 1
        data = super().datasets(cfg, paths)
        if paths is not None:
            data["extra"] = np.load(paths.root / "extra.npy")
        return data


def test_data_sets_read_once_per_command_and_again_when_their_files_change(tmp_path) -> None:
    cfg = parse_config({"data": {"train_size": 30, "query_size": 4, "subset": "first"}})
    family, paths = _CountingFamily(), RunPaths(tmp_path)
    np.save(tmp_path / "extra.npy", np.arange(3))
    reference = ClassifierFamily.datasets(family, cfg)  # the classifier's own load, not held
    with one_command():
        first = family.datasets(cfg, paths)
        assert _CountingFamily.loads == 1
        first["train"] = None  # a caller replacing an entry changes only its own dict
        second = family.datasets(cfg, paths)
        assert _CountingFamily.loads == 1 and second["train"] is not None
        assert example_ids(second["train"]).tolist() == example_ids(reference["train"]).tolist()
        assert second["extra"].tolist() == [0, 1, 2]
        np.save(tmp_path / "extra.npy", np.arange(5))  # a stage rewrote a file the data sets read
        assert family.datasets(cfg, paths)["extra"].tolist() == [0, 1, 2, 3, 4] and _CountingFamily.loads == 2
        assert "extra" not in family.datasets(cfg) and _CountingFamily.loads == 3  # no run folder: read anew
        family.datasets(cfg, paths)  # one copy is kept: the folder's data sets are read again
        assert _CountingFamily.loads == 4
    family.datasets(cfg, paths), family.datasets(cfg, paths)  # outside a command: every call loads
    assert _CountingFamily.loads == 6


def test_a_tiny_run_loads_its_data_sets_twice(tmp_path, monkeypatch) -> None:
    """Once without the run folder (config checks) and once with it; before: nine times."""
    from pipelines import held

    loads = []
    real = held.held

    def counting(key, files, make, folder=None):
        return real(key, files, lambda: loads.append(key[0]) or make(), folder)

    monkeypatch.setattr(base, "held", counting)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.read_text())
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert loads.count("datasets") == 2
