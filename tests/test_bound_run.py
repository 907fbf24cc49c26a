"""A run is bound once per command (pipelines.methods.bound): inside one command the same
configuration and folder give the same BoundRun and the fitted scorer is read once (again after a
refit); outside a command every call binds anew, as before."""

from __future__ import annotations

import shutil

import numpy as np

from pipelines.layout import RunPaths
from pipelines.methods.bound import bind, one_command
from pipelines.run_folder import recorded_config
from pipelines.stages import load_scorer, scorer_for
from stores import scorer_state


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
