"""``featurize.projection: factored`` as a run setting: config round trip and checks, fingerprints
of configs without the new keys unchanged, errors naming the keys to fix, and tiny end-to-end
runs of the classifier (CNN) and diffusion families (the causal LM's is in test_lm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.cli.main import main
from pipelines.config import FEATURE_SECTIONS, LATER_KEYS, SCORE_SECTIONS, load_config, parse_config, section_fingerprint
from pipelines.families import family_for
from pipelines.families.base import projection_width as _width


def projection_width(cfg):
    return _width(cfg, family_for(cfg).build_model(cfg))

from pipelines.run import feature_fingerprint, make_featurizer
from pipelines.spec.schema import UNHASHED_SECTION_KEYS, input_digests
from stores import FeatureStore
from stores._io import fingerprint
from tda.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
NEW_KEYS = ("projection", "k_in", "k_out", "nonzeros")
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")


def test_auto_projection_follows_the_model_not_its_name() -> None:
    from pipelines.families.base import resolved_projection
    from pipelines.run import build_model

    def resolved(**values):
        cfg = parse_config(values)
        return resolved_projection(cfg, model=build_model(cfg))

    assert resolved() == "tensorsketch"  # classifier MLP
    assert resolved(model={"arch": "cnn", "hidden": [8, 8]}) == "tensorsketch"
    assert resolved(model={"family": "causal-lm", "arch": "gpt2"}, data={"name": "tinyshakespeare"}) == "tensorsketch"
    assert resolved(featurize={"params": ["0.weight"]}) == "sparse"  # parameter names: the sparse projection's
    assert resolved_projection(parse_config({})) == "auto"  # neither a model nor stored features: undecided
    for explicit in ("dense", "sparse", "factored", "tensorsketch"):
        assert resolved(featurize={"projection": explicit}) == explicit


def test_featurize_projection_round_trips_and_is_checked() -> None:
    cfg = parse_config({"featurize": {"projection": "factored", "k_in": None, "k_out": 8}})
    assert (cfg.featurize.projection, cfg.featurize.k_in, cfg.featurize.k_out) == ("factored", None, 8)
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert parse_config({}, ["featurize.projection=factored", "featurize.k_in=null"]).featurize.k_in is None
    assert parse_config({}).featurize.projection == "auto"  # the default (benchmarks/projections.py)
    with pytest.raises(ConfigError, match=r"featurize.projection is 'kron'; choose one of \('auto', 'dense', 'sparse', 'factored', 'tensorsketch'\)"):
        parse_config({"featurize": {"projection": "kron"}})
    with pytest.raises(ConfigError, match="featurize.k_out must be >= 1"):
        parse_config({"featurize": {"k_out": 0}})
    with pytest.raises(ConfigError, match="did you mean 'k_in'"):
        parse_config({"featurize": {"kin": 4}})


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_fingerprints_of_configs_without_the_new_keys_are_unchanged(name: str) -> None:
    """The fingerprint of scheme 1 (the one run folders made before scheme 2 keep) equals the one of
    the config as it was before the keys existed."""
    cfg = load_config(ROOT / "configs" / name)
    before = cfg.to_dict()
    for key in NEW_KEYS:  # projection: sparse is the default now, and hashed (features differ from dense)
        if before["featurize"][key] == LATER_KEYS[("featurize", key)]:
            del before["featurize"][key]
    for (section, key), default in LATER_KEYS.items():
        if section != "featurize" and before[section].get(key) == default:
            del before[section][key]
    for section, key in UNHASHED_SECTION_KEYS:  # display-only keys are never hashed
        del before[section][key]
    for dotted, digest in input_digests(cfg).items():  # inputs count by content (issue 11)
        section, key = dotted.split(".")
        before[section][key] = {"sha256": digest}
    for sections in (FEATURE_SECTIONS, SCORE_SECTIONS):
        assert section_fingerprint(cfg, *sections, version=1) == fingerprint({s: before[s] for s in sections})
    factored = load_config(ROOT / "configs" / name, ["featurize.projection=factored"])
    smaller = load_config(ROOT / "configs" / name, ["featurize.projection=factored", "featurize.k_in=8"])
    assert len({feature_fingerprint(c) for c in (cfg, factored, smaller)}) == 3


def test_old_lm_option_and_bad_layer_names_point_to_the_keys() -> None:
    lm = {"data": {"name": "tinyshakespeare"}, "model": {"family": "causal-lm", "arch": "gpt2"}}
    with pytest.raises(ConfigError, match="model.options.projection has moved to featurize.projection"):
        parse_config({**lm, "model": {**lm["model"], "options": {"projection": "factored", "k_in": 8}}})
    cfg = parse_config({"featurize": {"projection": "factored", "params": ["nope"]}})
    with pytest.raises(ConfigError, match="featurize.params: 'nope' names no layer the factored projection supports"):
        make_featurizer(cfg)
    with pytest.raises(ConfigError, match="featurize.params: 'nope'"):
        projection_width(cfg)


@needs_mnist
def test_classifier_cnn_runs_factored_end_to_end(tmp_path, capsys) -> None:
    text = (f"name: cnn-factored\ndata: {{root: {MNIST}, train_size: 64, query_size: 6}}\n"
            "model: {arch: cnn, hidden: [4, 8]}\ntrain: {models: 1, epochs: 1, batch_size: 16}\n"
            "featurize: {projection: factored, k_in: 8, k_out: 4, batch_size: 32, shard_size: 32}\n"
            "score: {scorer: graddot, topk: 3, show: 1}\n")
    (tmp_path / "cfg.yaml").write_text(text)
    assert main(["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "query id" in capsys.readouterr().out
    store = FeatureStore.open(tmp_path / "run" / "features-train")
    # conv 1->4 (d_in 10 >= 8: random; d_out 4: identity), conv 4->8 (37 -> 8, 8 -> 4), linear (393 -> 8, 10 -> 4)
    assert store.k == 4 * 8 + 4 * 8 + 4 * 8 == projection_width(load_config(tmp_path / "cfg.yaml"))
    spec = store.manifest["spec"]
    assert spec["projection"] == "factored" and spec["layers"] == ["1", "4", "8"] and spec["skipped"] == []
    scores = np.load(tmp_path / "run" / "scores" / "scores.npy")
    assert scores.shape == (6, 64) and np.isfinite(scores).all() and np.abs(scores).max() > 0


TINY_DDPM = f"""name: tiny-ddpm-factored
data: {{root: {MNIST}, train_size: 32, query_size: 2}}
model:
  family: diffusion
  arch: unet
  hidden: [4, 8]
  options: {{T: 50, beta_start: 1.0e-3, beta_end: 0.2, time_dim: 4, timesteps: 2, generate: 1, saved_checkpoints: 2}}
train: {{models: 1, epochs: 2, lr: 2.0e-3, batch_size: 16, checkpoints: all}}
featurize: {{projection: factored, k_in: 4, k_out: 2, batch_size: 16, shard_size: 32}}
score: {{scorer: diffusion-retrac, topk: 3, show: 1, influential_fraction: 0.3}}
"""


@needs_mnist
def test_diffusion_runs_factored_end_to_end(tmp_path, capsys) -> None:
    (tmp_path / "cfg.yaml").write_text(TINY_DDPM)
    run = tmp_path / "run"
    assert main(["run", str(tmp_path / "cfg.yaml"), "--out", str(run), "--quiet"]) == 0
    assert "generally influential" in capsys.readouterr().out
    width = projection_width(load_config(tmp_path / "cfg.yaml"))
    train, query = FeatureStore.open(run / "features-train"), FeatureStore.open(run / "features-query")
    assert train.k == width + 1 and query.k == 2 * (width + 1)  # one recorded draw / two grid draws, each [phi, norm]
    spec = train.manifest["spec"]
    assert spec["projection"] == "factored" and spec["mode"] == "slots" and "mid.norm1.weight" in spec["skipped"]
    scores = np.load(run / "scores" / "scores.npy")
    assert scores.shape == (3, 32) and np.isfinite(scores).all()
    assert json.loads((run / "scores" / "influential.json").read_text())["diffusion-retrac"]["k"] == 3
