"""Slot scorers read their projection width from the train feature store's manifest (no model is
built for it), and name the featurize step when the manifest cannot be read."""

from __future__ import annotations

import pytest

from pipelines.config import parse_config
from pipelines.layout import RunPaths
from pipelines.methods.scorers import build_scorer, slot_width
from stores import FeatureStore
from tda.errors import StoreError

DDPM = {"model": {"family": "diffusion", "arch": "unet", "hidden": [4, 8],
                  "options": {"T": 50, "time_dim": 4, "timesteps": 3, "saved_checkpoints": 2}},
        "featurize": {"k": 16}}


def _store(paths: RunPaths, k: int, spec: dict) -> None:
    FeatureStore.create(paths.store("train"), n=4, k=k, checkpoints=[0], shard_size=4, fingerprint="fp",
                        spec=spec)


@pytest.mark.parametrize("scorer", ["graddot", "gradcos"])
def test_slot_width_is_the_manifests(tmp_path, scorer) -> None:
    cfg, paths = parse_config({**DDPM, "score": {"scorer": scorer}}), RunPaths(tmp_path)
    _store(paths, 17, {"k": 16, "mode": "slots"})  # one slot [phi (16), norm]
    assert slot_width(cfg, paths) == 16
    assert build_scorer(cfg, paths).k == 16


def test_slot_width_of_a_manifest_without_the_projectors_k(tmp_path) -> None:
    cfg, paths = parse_config({**DDPM, "score": {"scorer": "graddot"}}), RunPaths(tmp_path)
    _store(paths, 9, {"mode": "slots"})
    assert slot_width(cfg, paths) == 8


def test_no_manifest_names_the_featurize_step(tmp_path) -> None:
    cfg = parse_config({**DDPM, "score": {"scorer": "graddot"}})
    with pytest.raises(StoreError, match=r"reads the projection width of its slot features from the train feature "
                                         r"store's manifest, which cannot be read \(.*\); featurize first: `tda run "
                                         r"CONFIG --out "):
        build_scorer(cfg, RunPaths(tmp_path))
