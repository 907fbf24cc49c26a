"""Every scorer on every family from config: RepSim on the classifier, causal-LM and DDPM
families (against hidden states computed by hand), the generic TracInCP / Grad-Dot / Grad-Cos on
the diffusion family's slot features, and the AirRep subset jobs of the LM and DDPM families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.cli.main import main
from pipelines.config import load_config, parse_config
from pipelines.families import get_family
from pipelines.run import datasets_for
from stores import FeatureStore
from tda.scorers.airrep.head import check_disjoint
from tda.data.loading import mnist_collate
from tda.errors import ConfigError, DataError
from tda.featurizers.representations import hidden_states

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)


# ------------------------------------------------------------------ classifier
@needs_mnist
def test_classifier_repsim_from_config_equals_hidden_state_cosine(tmp_path) -> None:
    run = tmp_path / "run"
    sets = [f"data.root={MNIST}", "score.scorer=repsim", "score.options={metric: cosine}"]
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(run), "--quiet",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    data = datasets_for(cfg)
    x = {split: mnist_collate(data[split][:])["x"] for split in ("train", "query")}
    model = get_family("classifier").build_model(cfg)
    ref = 0.0
    for m in range(2):  # cosine of the hidden ReLU ("1"), averaged over the two trained models
        model.load_state_dict(torch.load(run / "checkpoints" / f"model-{m:02d}-epoch-001.pt", weights_only=True))
        h = {s: hidden_states(model, "1", x[s]).double().numpy() for s in x}
        ref = ref + _unit(h["query"]) @ _unit(h["train"]).T / 2
    scores = np.load(run / "scores" / "scores.npy")
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    assert FeatureStore.open(run / "features-train").k == 16


def test_representation_module_defaults_and_override() -> None:
    fam = get_family("classifier")
    cnn = parse_config({"data": {"name": "cifar2"}, "model": {"arch": "cnn", "hidden": [4, 8]},
                        "score": {"scorer": "repsim"}})
    assert fam.module_name(parse_config({"model": {"hidden": [32, 16]}, "score": {"scorer": "repsim"}})) == "3"
    assert type(dict(fam.build_model(cnn).named_modules())[fam.module_name(cnn)]).__name__ == "Flatten"
    other = parse_config({"score": {"scorer": "repsim", "options": {"module": "0"}}})
    assert fam.module_name(other) == "0"
    bad = parse_config({"data": {"root": str(MNIST)}, "score": {"scorer": "repsim", "options": {"module": "fc9"}}})
    with pytest.raises(ConfigError, match="available module names: '0', '1', '2'"):
        fam.featurizer(bad, "train", "representations")


# ------------------------------------------------------------------ causal LM
WORDS = ("the cat sat on mat a dog ran to park we sing songs at noon my red fox jumps over logs you bake bread with "
         "salt and oil her bird can fly high old men fish by quiet river kids play chess in warm hall").split()


def _lm_config(tmp_path: Path, scorer: str, options: dict | None = None) -> dict:
    corpus = tmp_path / "input.txt"
    if not corpus.is_file():  # seeded random words: no repeated passages
        corpus.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=300)) + ".")
    return {
        "name": "tiny-lm", "out_dir": str(tmp_path / scorer),
        "data": {"name": "text", "root": str(tmp_path), "train_size": 30, "query_split": "train", "query_size": 3},
        "model": {"family": "causal-lm", "arch": "gpt2",
                  "options": {"context": 24, "n_layer": 1, "n_head": 2, "n_embd": 16, "prompt_len": 8,
                              "test_start": 0.7, "queries": [["the cat ", "sat on"]]}},
        "train": {"models": 1, "epochs": 8, "lr": 1e-2, "batch_size": 16},
        "featurize": {"k": 16, "batch_size": 16, "shard_size": 16},
        "score": {"scorer": scorer, "topk": 3, "show": 1, **({"options": options} if options else {})},
    }


def test_lm_repsim_from_config_finds_each_sequence_itself(tmp_path) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(_lm_config(tmp_path, "repsim")))
    assert main(["run", str(path), "--quiet"]) == 0
    store = FeatureStore.open(tmp_path / "repsim" / "features-train")
    assert store.k == 16  # ln_f width (n_embd)
    with np.load(tmp_path / "repsim" / "scores" / "topk.npz") as z:
        assert z["proponent_ids"][1:, 0].tolist() == [0, 1, 2]  # queries 1..3 are training sequences 0..2
        np.testing.assert_allclose(z["proponent_scores"][1:, 0], 1.0, atol=1e-5)  # cosine with itself


def test_lm_airrep_runs_end_to_end(tmp_path) -> None:
    """Text queries have one provenance key per character: the retraining width is the query count."""
    pytest.importorskip("transformers")
    options = {"queries": 6, "subsets": 3, "subset_epochs": 1, "steps": 10, "width": 4}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(_lm_config(tmp_path, "airrep", options)))
    assert main(["run", str(path), "--quiet"]) == 0
    scores = np.load(tmp_path / "airrep" / "scores" / "scores.npy")
    assert scores.shape == (4, 30) and np.isfinite(scores).all()
    (folder,) = (tmp_path / "airrep" / "airrep").iterdir()
    assert json.loads((folder / "provenance.json").read_text())["query_ids"] == [30, 35]


def test_lm_airrep_queries_and_subset_job(tmp_path) -> None:
    pytest.importorskip("transformers")
    cfg = parse_config(_lm_config(tmp_path, "airrep", {"queries": 4, "subsets": 2}))
    fam = get_family("causal-lm")
    queries = fam.airrep_queries(cfg)
    assert queries["id"] == [30, 31, 32, 33] and sum(queries[0]["loss_mask"]) == 24 - 8
    keys = {role: fam.provenance(cfg, role) for role in ("train", "query", "airrep")}
    assert len(keys["train"]) == 30 * 24 and keys["airrep"][0] == f"chars/{30 * 24}"
    check_disjoint(keys["airrep"], {"train": keys["train"], "evaluation": keys["query"]})
    job = fam.subset_job(cfg, "airrep", epochs=1)
    rows = np.arange(0, 30, 2)
    out = job((rows, 7))
    assert out.shape == (4,) and np.isfinite(out).all() and np.all(out < 0)  # log-probabilities
    np.testing.assert_array_equal(job((rows, 7)), out)  # seeded
    too_many = parse_config(_lm_config(tmp_path, "airrep", {"queries": 500}))
    with pytest.raises(DataError, match="lower data.train_size or score.options.queries"):
        fam.airrep_queries(too_many)


# ------------------------------------------------------------------ diffusion
TINY_DDPM = {
    "name": "tiny-ddpm", "data": {"root": str(MNIST), "train_size": 48, "query_size": 3, "subset": "first"},
    "model": {"family": "diffusion", "arch": "unet", "hidden": [4, 8],
              "options": {"T": 50, "beta_start": 1.0e-3, "beta_end": 0.2, "time_dim": 4, "timesteps": 3,
                          "generate": 2, "saved_checkpoints": 2}},
    "train": {"models": 1, "epochs": 2, "lr": 2.0e-3, "batch_size": 16, "checkpoints": "all"},
    "featurize": {"k": 16, "batch_size": 16, "shard_size": 32},
    "score": {"topk": 3, "show": 1, "influential_fraction": 0.3},
}


def _ddpm(tmp_path: Path, scorer: str, **score: object) -> Path:
    path = tmp_path / f"{scorer}.yaml"
    path.write_text(yaml.safe_dump({**TINY_DDPM, "score": {**TINY_DDPM["score"], "scorer": scorer, **score}}))
    return path


@needs_mnist
def test_diffusion_repsim_from_config_on_the_bottleneck(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", str(_ddpm(tmp_path, "repsim")), "--out", str(run), "--quiet"]) == 0
    assert "most similar training images (RepSim)" in capsys.readouterr().out
    train, query = FeatureStore.open(run / "features-train"), FeatureStore.open(run / "features-query")
    assert train.k == query.k == 8 * 7 * 7  # "mid": 8 channels at 7x7, averaged over the 3 grid draws
    scores = np.load(run / "scores" / "scores.npy")
    assert scores.shape == (5, 48) and np.abs(scores).max() <= 1 + 1e-5


@needs_mnist
def test_diffusion_runs_tracin_graddot_gradcos_on_shared_slot_features(tmp_path, capsys) -> None:
    """The generic scorers reuse the Diffusion-TracIn features (same run folder); tracin gives
    Diffusion-TracIn's scores exactly and gradcos lies in [-1, 1]."""
    run = tmp_path / "run"
    assert main(["run", str(_ddpm(tmp_path, "tracin")), "--out", str(run), "--quiet"]) == 0
    scores = {"tracin": np.load(run / "scores" / "scores.npy")}
    for name in ("diffusion-tracin", "graddot", "gradcos"):
        assert main(["run", str(_ddpm(tmp_path, name)), "--out", str(run), "--quiet", "--from", "index"]) == 0
        scores[name] = np.load(run / "scores" / "scores.npy")
    out = capsys.readouterr().out
    assert "gradcos" in out and "diffusion-retrac" in out  # influence counts of the scorer and of both variants
    np.testing.assert_allclose(scores["tracin"], scores["diffusion-tracin"], rtol=1e-5, atol=1e-8)
    assert np.abs(scores["gradcos"]).max() <= 1 + 1e-5 and np.isfinite(scores["graddot"]).all()
    corr = np.corrcoef(scores["graddot"].ravel(), scores["tracin"].ravel())[0, 1]
    assert corr > 0.9  # both are learning-rate weighted / averaged versions of the same inner products


def test_diffusion_trak_is_dtrak_on_the_same_features(tmp_path) -> None:
    from pipelines.run import feature_fingerprint
    from pipelines.methods.scorers import build_scorer
    from tda.scorers import TRAKScorer

    trak, dtrak = (load_config(_ddpm(tmp_path, name)) for name in ("trak", "dtrak"))
    assert feature_fingerprint(trak) == feature_fingerprint(dtrak)
    assert isinstance(build_scorer(trak), TRAKScorer)


@needs_mnist
def test_diffusion_airrep_subset_job_returns_grid_losses(tmp_path) -> None:
    cfg = load_config(_ddpm(tmp_path, "airrep", options={"queries": 4, "subsets": 2}))
    fam = get_family("diffusion")
    queries = fam.airrep_queries(cfg)
    assert queries["id"] == [48, 49, 50, 51]
    prov = fam.provenance(cfg, "query")
    assert prov[:3] == ["mnist/test/0", "mnist/test/1", "mnist/test/2"]
    job = fam.subset_job(cfg, "airrep", epochs=1)
    out = job((np.arange(24), 3))
    assert out.shape == (4,) and np.isfinite(out).all() and np.all(out > 0)  # mean L_simple over the grid
    np.testing.assert_array_equal(job((np.arange(24), 3)), out)


@needs_mnist
def test_diffusion_airrep_runs_end_to_end(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    options = {"queries": 6, "subsets": 3, "subset_epochs": 1, "steps": 10, "width": 4}
    assert main(["run", str(_ddpm(tmp_path, "airrep", options=options)), "--out", str(run), "--quiet"]) == 0
    assert "airrep" in capsys.readouterr().out
    scores = np.load(run / "scores" / "scores.npy")
    assert scores.shape == (5, 48) and np.isfinite(scores).all()
    (folder,) = (run / "airrep").iterdir()
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["query_ids"] == [48, 53] and prov["keys"]["evaluation"]["last"] == "generated/1000001"

