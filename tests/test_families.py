"""The model-family seam of the pipeline: registry, config checks, fingerprints, and the
CIFAR-2 classifier and MNIST diffusion families end to end on tiny subsets."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.families import registry as families
from pipelines.cli.main import main
from pipelines.config import FEATURE_SECTIONS, SCORE_SECTIONS, load_config, parse_config, section_fingerprint
from pipelines.families import Family, get_family, register_family
from pipelines.methods.scorers import SCORERS
from pipelines.families.classifier import ClassifierFamily
from pipelines.families.images import CIFAR2_FILE, data_root
from pipelines.families.training import train_classifier
from pipelines.run import datasets_for, feature_fingerprint, make_featurizer
from stores import FeatureStore
from stores._io import fingerprint
from tda.data.loading import as_dataset
from tda.errors import ConfigError, DataError
from tda.models.reference import mlp
from tda.models.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MNIST, CIFAR = SHARED / "mnist", SHARED / "cifar10"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------ registry and config
def test_registry_knows_the_families_and_names_them_on_error() -> None:
    assert isinstance(get_family("classifier"), ClassifierFamily)
    usable = {name: {s for s in SCORERS if set(SCORERS[s].kinds) & set(get_family(name).feature_kinds)}
              for name in ("classifier", "causal-lm", "diffusion")}
    assert usable["diffusion"] == {"dtrak", "diffusion-tracin", "diffusion-retrac", "trak", "tracin",
                                   "graddot", "gradcos", "repsim", "airrep"}
    generic = {"trak", "tracin", "graddot", "gradcos", "repsim", "airrep"}  # every scorer on every family
    assert all(generic <= usable[name] for name in usable)
    with pytest.raises(ConfigError, match=r"model.family is 'gan'; choose one of \(.*'classifier', 'diffusion'"):
        parse_config({"model": {"family": "gan"}})
    with pytest.raises(ConfigError, match="already registered"):
        register_family(ClassifierFamily())


@pytest.mark.parametrize("values, fix", [
    ({"score": {"scorer": "dtrak"}}, "score.scorer 'dtrak' scores grid features, which the 'classifier' family does not produce"),
    ({"model": {"family": "diffusion", "arch": "mlp"}}, "model.arch is 'mlp'; the 'diffusion' family"),
    ({"model": {"family": "diffusion", "arch": "unet"}, "data": {"name": "cifar2"}}, "data.name is 'cifar2'"),
    ({"model": {"family": "diffusion", "arch": "unet", "options": {"timestep": 5}},
      "score": {"scorer": "dtrak"}}, "did you mean 'timesteps'"),
    ({"model": {"family": "diffusion", "arch": "unet", "options": {"output": "mse"}},
      "score": {"scorer": "dtrak"}}, "model.options.output is 'mse'"),
    ({"model": {"family": "diffusion", "arch": "unet", "options": {"optimizer": "adamw"}},
      "score": {"scorer": "dtrak"}}, "model.options.optimizer is 'adamw'; choose one of"),
    ({"model": {"options": {"T": 5}}}, "takes no model.options"),
    ({"model": {"options": 5}}, "model.options must be a mapping"),
], ids=["scorer", "arch", "data", "option typo", "option value", "optimizer", "no options", "options type"])
def test_config_is_checked_against_the_family(values: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        parse_config(values)


def test_classifier_fingerprints_ignore_the_new_keys_at_their_defaults() -> None:
    """Configs written before families existed keep their fingerprints of scheme 1 (and run folders)."""
    for name in ("tiny.yaml", "mnist_trak.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        old = cfg.to_dict()
        del old["model"]["family"], old["model"]["options"], old["score"]["influential_fraction"]
        assert old["featurize"]["projection"] == "auto"  # the default since tensorsketch: hashed, features differ
        del old["featurize"]["k_in"], old["featurize"]["k_out"], old["featurize"]["nonzeros"]
        del old["data"]["query_path"], old["score"]["dense"], old["score"]["options"], old["code_dir"]
        del old["score"]["text_chars"]
        for key in ("train_path", "collate", "text_column", "label_column", "image_column", "tokenizer", "max_length",
                    "label_noise", "image_layout", "image_scale", "class_names"):
            del old["data"][key]
        for key in ("factory", "hf", "hf_class", "checkpoints", "task", "check_trained"):
            del old["model"][key]
        for key in ("factory", "optimizer", "momentum", "weight_decay", "schedule", "warmup_steps", "init"):
            del old["train"][key]
        for key in ("hnsw_m", "ef_construction", "ef_search", "recall_queries"):
            del old["index"][key]
        for sections in (FEATURE_SECTIONS, SCORE_SECTIONS):
            assert section_fingerprint(cfg, *sections, version=1) == fingerprint({s: old[s] for s in sections})
        assert feature_fingerprint(cfg) == section_fingerprint(cfg, *FEATURE_SECTIONS)
        dense = load_config(ROOT / "configs" / name, ["featurize.projection=dense"])  # the former default
        del old["featurize"]["projection"]
        assert section_fingerprint(dense, *FEATURE_SECTIONS, version=1) == fingerprint({s: old[s] for s in
                                                                                        FEATURE_SECTIONS})


def test_diffusion_feature_fingerprint_follows_the_feature_layout() -> None:
    cfg = load_config(ROOT / "configs" / "mnist_ddpm.yaml")
    other = load_config(ROOT / "configs" / "mnist_ddpm.yaml", ["score.scorer=diffusion-tracin"])
    dtrak = load_config(ROOT / "configs" / "mnist_ddpm.yaml", ["score.scorer=dtrak"])
    assert feature_fingerprint(cfg) == feature_fingerprint(other)  # TracIn and ReTrac share features
    assert feature_fingerprint(cfg) != feature_fingerprint(dtrak)
    assert get_family("diffusion").checkpoint_epochs(cfg) == [9, 19, 29]


def test_diffusion_grid_train_draws_pool_the_training_loss_gradient() -> None:
    """train_draws: grid: one pooled slot of the training-loss gradient averaged over the grid."""
    grid = load_config(ROOT / "configs" / "mnist_ddpm.yaml", ["model.options.train_draws=grid"])
    train, query = make_featurizer(grid, "train"), make_featurizer(grid, "query")  # no run folder needed
    assert (train.mode, train.task.output_name, train.feature_dim) == ("pooled", "loss", grid.featurize.k + 1)
    assert train.spec()["draws"]["side"] == 0 and query.spec()["draws"]["side"] == 1
    assert train.spec()["draws"]["grid"] == query.spec()["draws"]["grid"] and query.mode == "slots"
    recorded = load_config(ROOT / "configs" / "mnist_ddpm.yaml")
    assert feature_fingerprint(grid) != feature_fingerprint(recorded)
    with pytest.raises(ConfigError, match="choose 'recorded', 'seeded' or 'grid'"):
        load_config(ROOT / "configs" / "mnist_ddpm.yaml", ["model.options.train_draws=all"])


def test_diffusion_ground_truth_measures_the_attributed_output(monkeypatch) -> None:
    """The LDS ground truth's f is the query features' f: the same grid of timesteps and noise
    draws (a different noise side measured another noisy estimate of the loss than the one
    attributed), and its cache key changed with it."""
    from pipelines.families import diffusion as dfam
    from pipelines.ground_truth import job_fingerprint
    from tda.featurizers.diffusion import DiffusionTask, noise_from_seeds

    cfg = load_config(ROOT / "configs" / "mnist_ddpm.yaml")
    family = get_family("diffusion")
    torch.manual_seed(0)
    model = family.build_model(cfg).eval()
    monkeypatch.setattr(dfam, "train_ddpm", lambda *a, **k: (model, None))
    x = torch.randn(3, 1, 28, 28).clamp(-1, 1)
    ids = np.array([4, 9, 11])
    measured = family.subset_job(cfg).run({"x": x}, ids, {"x": x}, ids, seed=0)
    query = make_featurizer(cfg, "query")
    t, seeds = query.draws(0, ids)
    task = DiffusionTask(family.schedule(cfg), family.options(cfg).output)
    with torch.no_grad():
        expect = torch.stack([task.output(model, {"x": x, "t": torch.from_numpy(t[:, s]),
                                                  "noise": noise_from_seeds(seeds[:, s], x.shape[1:])})
                              for s in range(t.shape[1])]).mean(dim=0)
    torch.testing.assert_close(measured, expect)
    current = job_fingerprint(cfg)
    reseeded = load_config(ROOT / "configs" / "mnist_ddpm.yaml", ["featurize.seed=1"])
    assert job_fingerprint(reseeded) != current  # another query grid: another measured f
    monkeypatch.setattr(dfam.DiffusionFamily, "measure_key", lambda self, c: {})  # as before the change
    assert job_fingerprint(cfg) != current  # ground truth cached with the old f is not reused


@functools.lru_cache(maxsize=1)
def _toy_data() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 5, generator=gen).numpy()
    rows = {"id": np.arange(60) + 500, "x": x, "label": np.argmax(x[:, :3], axis=1)}
    return {"train": as_dataset({k: v[:50] for k, v in rows.items()}),
            "query": as_dataset({k: v[50:] for k, v in rows.items()})}


class ToyFamily(Family):
    """A family registered by a test: synthetic 5-d data, an MLP, the margin, SGD."""

    name, archs, data_names, scorers = "toy", ("mlp",), ("synthetic",), ("trak",)

    def datasets(self, cfg: Any, paths: Any = None) -> dict[str, Any]:
        return _toy_data()

    def build_model(self, cfg: Any) -> torch.nn.Module:
        return mlp(5, tuple(cfg.model.hidden), 3)

    def task(self, cfg: Any) -> ClassificationTask:
        return ClassificationTask()

    def collate(self, cfg: Any):
        return lambda rows: {"x": torch.tensor(np.asarray(rows["x"], np.float32)),
                             "y": torch.tensor(np.asarray(rows["label"], np.int64))}

    def train(self, cfg: Any, paths: Any, model_index: int, save: Any) -> dict[str, Any]:
        b = self.collate(cfg)(self.datasets(cfg)["train"][:])
        train_classifier(lambda: self.build_model(cfg), b["x"], b["y"], epochs=cfg.train.epochs, seed=model_index,
                         on_epoch=save)
        return {"note": "toy"}


def test_a_registered_family_runs_through_the_pipeline(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(families._FAMILIES, "toy", ToyFamily())
    cfg = _write(tmp_path, "model: {family: toy, hidden: [4]}\ndata: {name: synthetic}\n"
                           "train: {models: 1, epochs: 2}\nfeaturize: {k: 8, shard_size: 16}\nscore: {topk: 2, show: 1}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "query id 550" in out and out.count("train id") == 4
    scores = np.load(tmp_path / "run" / "scores" / "scores.npy")
    assert scores.shape == (10, 50) and np.isfinite(scores).all()
    listing = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())
    assert listing["checkpoints"][0]["note"] == "toy" and listing["checkpoints"][0]["epoch"] == 1


# ------------------------------------------------------------------ classifier data sets
def _cifar2_yaml(root: Path) -> str:
    return (f"name: cifar2-tiny\ndata: {{name: cifar2, root: {root}, train_size: 64, query_size: 8, subset: first}}\n"
            "model: {arch: cnn, hidden: [4, 8]}\ntrain: {models: 1, epochs: 2, batch_size: 16}\n"
            "featurize: {k: 32, batch_size: 32, shard_size: 32}\nscore: {topk: 3, show: 1}\n")


@pytest.mark.skipif(not (CIFAR / CIFAR2_FILE).is_file(), reason=f"{CIFAR / CIFAR2_FILE} not present")
def test_cifar2_cnn_classifier_runs_end_to_end(tmp_path, capsys) -> None:
    cfg_path = _write(tmp_path, _cifar2_yaml(CIFAR))
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cifar2-tiny: 64 training examples, 8 queries, 1 checkpoints" in out
    cfg = load_config(cfg_path)
    data = datasets_for(cfg)
    with np.load(CIFAR / CIFAR2_FILE) as z:
        x0, y = z["x_train"][0], z["y_train"][:64]
    np.testing.assert_array_equal(np.asarray(data["train"][0]["image"]).reshape(3, 32, 32), x0.transpose(2, 0, 1))
    np.testing.assert_array_equal(data["train"]["label"], y)
    batch = get_family("classifier").collate(cfg)(data["train"][:4])
    assert batch["x"].shape == (4, 3072) and abs(float(batch["x"].mean())) < 1.5
    model = get_family("classifier").build_model(cfg)
    assert isinstance(model[1], torch.nn.Conv2d) and model(batch["x"]).shape == (4, 2)
    scores = np.load(tmp_path / "run" / "scores" / "scores.npy")
    assert scores.shape == (8, 64) and np.isfinite(scores).all()
    with np.load(tmp_path / "run" / "scores" / "topk.npz") as z:
        np.testing.assert_allclose(z["proponent_scores"], -np.sort(-scores, axis=1)[:, :3], rtol=1e-4, atol=1e-6)


def test_missing_classifier_data_is_reported(tmp_path) -> None:
    cfg = load_config(_write(tmp_path, _cifar2_yaml(tmp_path)))
    with pytest.raises(DataError, match=f"CIFAR-2 file .*{CIFAR2_FILE} not found; set data.root"):
        datasets_for(cfg)
    fashion = parse_config({"data": {"name": "fashion-mnist", "root": str(tmp_path / "none")}})
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        datasets_for(fashion)
    assert data_root(parse_config({"data": {"name": "fashion-mnist"}})) == str(FASHION)
    assert data_root(parse_config({"data": {"name": "cifar2"}})) == str(ROOT.parent / "shared" / "data" / "cifar10")


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST not installed in {FASHION}")
def test_fashion_mnist_loads() -> None:
    cfg = parse_config({"data": {"name": "fashion-mnist", "train_size": 20, "query_size": 5}})
    data = datasets_for(cfg)
    assert len(data["train"]) == 20 and len(data["query"]) == 5
    assert get_family("classifier").collate(cfg)(data["train"][:3])["x"].shape == (3, 784)


# ------------------------------------------------------------------ diffusion family
TINY_DDPM = f"""name: tiny-ddpm
data: {{root: {MNIST}, train_size: 48, query_size: 3, subset: first}}
model:
  family: diffusion
  arch: unet
  hidden: [4, 8]
  options: {{T: 50, beta_start: 1.0e-3, beta_end: 0.2, time_dim: 4, timesteps: 3, generate: 2, saved_checkpoints: 2}}
train: {{models: 1, epochs: 2, lr: 2.0e-3, batch_size: 16, checkpoints: all}}
featurize: {{k: 16, batch_size: 16, shard_size: 32}}
score: {{scorer: diffusion-retrac, topk: 3, show: 1, influential_fraction: 0.3}}
"""


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")
def test_diffusion_family_runs_end_to_end(tmp_path, capsys) -> None:
    cfg_path, run = _write(tmp_path, TINY_DDPM), tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "48 training images, 5 queries (3 test, 2 generated), 2 checkpoints" in out
    assert "query id 1000000  generated image" in out and "generally influential" in out
    assert "diffusion-tracin" in out and "diffusion-retrac" in out
    train, query = FeatureStore.open(run / "features-train"), FeatureStore.open(run / "features-query")
    assert train.k == 17 and query.k == 3 * 17 and train.checkpoints == [0, 1]
    listing = json.loads((run / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    assert [c["epoch"] for c in listing] == [0, 1] and all(c["lr"] > 0 for c in listing)
    with np.load(run / "checkpoints" / "model-00-trainlog.npz") as z:
        assert len(z["step"]) == 2 * 48 and set(z["example_id"]) == set(range(48))
    influential = json.loads((run / "scores" / "influential.json").read_text())
    assert set(influential) == {"diffusion-tracin", "diffusion-retrac"} and influential["diffusion-retrac"]["k"] == 3
    assert main(["query", "--run", str(run), "--example", "1000001", "-k", "2"]) == 0
    assert "query id 1000001" in capsys.readouterr().out
    assert main(["run", str(cfg_path), "--out", str(run), "--quiet", "--set", "score.scorer=dtrak"]) == 2
    assert "overwrite" in capsys.readouterr().err  # D-TRAK features differ: the folder is refused
    assert main(["validate", str(cfg_path), "--out", str(run), "--quiet", "--set", "validate.subsets=4",
                 "--set", "validate.plots=false"]) == 0  # the diffusion family validates its test queries
    res = json.loads((run / "validation" / "validation.json").read_text())
    assert res["n_queries"] == 3 and {"diffusion-retrac", "diffusion-tracin", "tracin"} <= set(res["scorers"])
    assert all(np.isfinite(r["all"]["mean"]) or r["all"]["n_undefined"] for r in res["scorers"].values())
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "dtrak"), "--quiet", "--set", "score.scorer=dtrak",
                 "--set", "model.options.output=square"]) == 0
    assert FeatureStore.open(tmp_path / "dtrak" / "features-query").k == 16
    assert "f = square" in capsys.readouterr().out
