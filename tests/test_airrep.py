"""AirRep-style learned representations (docs/methods.md section 5): head training on a synthetic
problem with a known answer, group scores against explicit loops, the scorer seam (state round
trip, FAISS top-k), disjointness, and the pipeline end to end on a tiny classifier config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli.main import main
from pipelines.config import FEATURE_SECTIONS, load_config, section_fingerprint
from pipelines.run import RunPaths, feature_fingerprint
from stores import FeatureStore
from stores.index import build_index
from tda.scorers.airrep.head import (AirRepData, HeadConfig, check_disjoint, group_scores, held_out_spearman, ranking_loss,
                        train_head)
from tda.errors import ConfigError, DataError, LeakageError, ShapeError, TDAError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import score_matrix, top_k
from tda.scorers import AirRepScorer, make_scorer
from tda.validation import sample_subsets

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def _synthetic(n: int = 200, h: int = 10, d: int = 3, q: int = 90, j: int = 40, noise: float = 0.05, seed: int = 0):
    """Outputs that are a known linear function of subset membership through a hidden map W:
    ``y_j(q) = sum_{i in S_j} <W h_q, W h_i> + noise``; the true effect of i on q is ``<W h_q, W h_i>``."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((h, d))
    h_train, h_query = rng.standard_normal((n, h)), rng.standard_normal((q, h))
    effects = (h_query @ w) @ (h_train @ w).T  # (q, n)
    masks = sample_subsets(n, j, 0.5, seed)
    outputs = masks @ effects.T  # (J, q)
    outputs = outputs + noise * outputs.std() * rng.standard_normal(outputs.shape)
    return h_train, h_query, masks, outputs, effects


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from tda.validation import spearman_columns

    return spearman_columns(a.T, b.T)


def _embed(trained, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return trained.head(torch.from_numpy(((x - trained.mean) / trained.std).astype(np.float32))).numpy()


def _data(n_fit: int = 60, **kw) -> tuple[AirRepData, FeatureBlock, FeatureBlock, np.ndarray]:
    """Synthetic supervision on the first ``n_fit`` queries; the rest are unseen test queries."""
    h_train, h_query, masks, outputs, effects = _synthetic(**kw)
    n, q = len(h_train), len(h_query)
    train = FeatureBlock(np.arange(n) + 1000, h_train[None].astype(np.float32), np.ones((1, n)))
    test = FeatureBlock(np.arange(q - n_fit), h_query[None, n_fit:].astype(np.float32), np.ones((1, q - n_fit)))
    data = AirRepData(train.ids, h_query[None, :n_fit], np.arange(n_fit) + 5000, masks, outputs[:, :n_fit])
    return data, train, test, effects[n_fit:]


# ------------------------------------------------------------------ head training
@pytest.mark.parametrize("hidden, pooling", [(0, "sum"), (32, "attention")])
def test_head_training_reduces_the_loss_and_recovers_known_effects(hidden: int, pooling: str) -> None:
    h_train, h_query, masks, outputs, effects = _synthetic()
    fit, test = slice(0, 60), slice(60, None)  # the check is on queries the head never saw
    trained = train_head(h_train, h_query[fit], masks, outputs[:, fit],
                         HeadConfig(width=6, hidden=hidden, steps=150, lr=1e-2, pooling=pooling, seed=1))
    assert np.mean(trained.loss[-10:]) < 0.5 * np.mean(trained.loss[:10])
    assert 0 < trained.best_step <= 150 and len(trained.val_spearman) == 15
    learned = _embed(trained, h_query[test]) @ _embed(trained, h_train).T  # (30, n)
    rho = _rowwise_spearman(learned, effects[test])
    raw = _rowwise_spearman(h_query[test] @ h_train.T, effects[test])  # RepSim-like, untrained
    assert rho.mean() > 0.9 and rho.mean() > raw.mean() + 0.2, (rho.mean(), raw.mean())


def test_head_training_is_deterministic() -> None:
    h_train, h_query, masks, outputs, _ = _synthetic(n=80, q=20, j=10)
    cfg = HeadConfig(width=4, hidden=8, steps=20, seed=3)
    a, b = train_head(h_train, h_query, masks, outputs, cfg), train_head(h_train, h_query, masks, outputs, cfg)
    assert a.loss == b.loss
    for (name, x), y in zip(a.head.state_dict().items(), b.head.state_dict().values()):
        assert torch.equal(x, y), name


def test_group_scores_equal_explicit_loops(rng) -> None:
    e_q, e_t = torch.from_numpy(rng.standard_normal((3, 4))), torch.from_numpy(rng.standard_normal((9, 4)))
    masks = torch.from_numpy(sample_subsets(9, 5, 0.5, 2).astype(np.float64))
    sims = (e_q @ e_t.T).numpy()
    got_sum = group_scores(e_q, e_t, masks, "sum").numpy()
    got_att = group_scores(e_q, e_t, masks, "attention", temperature=0.7).numpy()
    for q in range(3):
        for j in range(5):
            members = np.nonzero(masks[j].numpy())[0]
            s = sims[q, members]
            a = np.exp(np.abs(s) / 0.7) / np.exp(np.abs(s) / 0.7).sum()
            np.testing.assert_allclose(got_sum[q, j], s.sum(), rtol=1e-12)
            np.testing.assert_allclose(got_att[q, j], len(members) * (a * s).sum(), rtol=1e-12)
    flat = group_scores(e_q, e_t, masks, "attention", temperature=1e9).numpy()  # uniform weights: the sum
    np.testing.assert_allclose(flat, got_sum, rtol=1e-6)


def test_ranking_loss_prefers_the_right_order_and_ignores_ties() -> None:
    y = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    right, wrong = ranking_loss(y.clone(), y), ranking_loss(-y, y)
    assert float(right) < float(wrong)
    tie = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # pairs within a tie have weight 0: their order is free
    g = torch.tensor([[1.0, 0.9, -0.9, -1.0]])
    swapped = torch.tensor([[0.9, 1.0, -1.0, -0.9]])  # the same differences across the tie groups
    assert float(ranking_loss(swapped, tie)) == pytest.approx(float(ranking_loss(g, tie)), rel=1e-6)
    assert float(ranking_loss(g, tie)) < float(ranking_loss(-g, tie))
    assert held_out_spearman(y, y) == pytest.approx(1.0) and held_out_spearman(-y, y) == pytest.approx(-1.0)


@pytest.mark.parametrize("kwargs, fix", [({"pooling": "max"}, "pooling"), ({"width": 0}, "width"),
                                         ({"val_fraction": 1.0}, "val_fraction"), ({"lr": 0}, "lr")])
def test_bad_head_settings_raise(kwargs: dict, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        HeadConfig(**kwargs)


# ------------------------------------------------------------------ the scorer seam
@pytest.fixture(scope="module")
def fitted() -> tuple[AirRepScorer, AirRepData, FeatureBlock, FeatureBlock, np.ndarray]:
    data, train, test, effects = _data()
    scorer = make_scorer("airrep", data=data, head=HeadConfig(width=6, hidden=16, steps=120, lr=1e-2))
    return scorer.fit(ArrayFeatures(train, [0])), data, train, test, effects


def test_scorer_learns_effects_of_unseen_queries(fitted) -> None:
    scorer, _, train, test, effects = fitted
    scores = score_matrix(test, scorer, ArrayFeatures(train, [0]), block_rows=64)
    assert scores.shape == (30, 200) and scores.dtype == np.float32
    assert _rowwise_spearman(scores, effects).mean() > 0.8


def test_state_dict_round_trip_gives_identical_scores(fitted, tmp_path) -> None:
    scorer, _, train, test, _ = fitted
    np.savez(tmp_path / "state.npz", **scorer.state_dict())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        state = {k: z[k] for k in z.files}
    loaded = AirRepScorer(head=scorer.config).load_state_dict(state)
    source = ArrayFeatures(train, [0])
    np.testing.assert_array_equal(score_matrix(test, loaded, source), score_matrix(test, scorer, source))
    assert loaded.fitted.best_step == scorer.fitted.best_step
    with pytest.raises(ConfigError, match="saved AirRep head used settings"):
        AirRepScorer(head=HeadConfig(width=6, hidden=16, steps=99)).load_state_dict(state)
    with pytest.raises(TDAError, match="missing"):
        AirRepScorer(head=scorer.config).load_state_dict({"mean": state["mean"]})


def test_faiss_index_top_k_equals_dense_scores(fitted) -> None:
    scorer, _, train, test, _ = fitted
    source = ArrayFeatures(train, [0])
    dense = score_matrix(test, scorer, source)
    got = build_index(source, scorer, block_rows=37).top_k(scorer.transform_query(test), 5)
    exact = top_k(test, scorer, source, k=5)
    tol = 1e-5 * np.abs(dense).max()
    np.testing.assert_allclose(got.proponent_scores, -np.sort(-dense, axis=1)[:, :5], atol=tol)
    np.testing.assert_allclose(got.opponent_scores, np.sort(dense, axis=1)[:, :5], atol=tol)
    np.testing.assert_allclose(exact.proponent_scores, got.proponent_scores, atol=tol)
    cols = got.proponent_ids - 1000  # training ids -> columns; compare scores (ties allowed)
    np.testing.assert_allclose(np.take_along_axis(dense, cols, axis=1), got.proponent_scores, atol=tol)


def test_scorer_misuse_raises(fitted) -> None:
    _, data, train, test, _ = fitted
    with pytest.raises(TDAError, match="not fitted"):
        AirRepScorer().transform_query(test)
    with pytest.raises(TDAError, match="needs subset-retraining data"):
        AirRepScorer().fit(ArrayFeatures(train, [0]))
    shuffled = FeatureBlock(train.ids[::-1].copy(), train.feats[:, ::-1].copy(), train.q)
    with pytest.raises(DataError, match="ids"):
        AirRepScorer(data).fit(ArrayFeatures(shuffled, [0]))
    wide = FeatureBlock(train.ids, np.concatenate([train.feats, train.feats], axis=2), train.q)
    with pytest.raises(ShapeError, match="same checkpoints and module"):
        AirRepScorer(data).fit(ArrayFeatures(wide, [0]))
    with pytest.raises(ShapeError, match="outputs"):
        AirRepData(data.train_ids, data.query_feats, data.query_ids, data.masks, data.outputs[:, :5])


# ------------------------------------------------------------------ disjointness
def test_overlapping_training_queries_are_refused() -> None:
    train = [f"mnist/train/{i}" for i in range(10)]
    check_disjoint([f"mnist/train/{i}" for i in range(10, 15)], {"training examples": train})
    with pytest.raises(LeakageError, match=r"2 of the AirRep training queries are also training examples"):
        check_disjoint([f"mnist/train/{i}" for i in range(8, 12)], {"training examples": train})
    data, *_ = _data()
    keys = {"train": [f"t{i}" for i in range(200)], "queries": [f"q{i}" for i in range(60)],
            "evaluation": ["q59", "e0"]}
    with pytest.raises(LeakageError, match="evaluation queries"):
        AirRepData(data.train_ids, data.query_feats, data.query_ids, data.masks, data.outputs, provenance=keys)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")
def test_pipeline_refuses_training_queries_that_are_evaluation_queries(tmp_path) -> None:
    from pipelines.methods.airrep import airrep_supervision

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"data.root={MNIST}", "data.train_size=100", "data.query_split=train", "data.query_size=150", "data.subset=first",
        "score.scorer=airrep", "score.options={queries: 20, subsets: 2}"])
    with pytest.raises(LeakageError, match="20 of the AirRep training queries are also evaluation queries"):
        airrep_supervision(cfg, RunPaths(tmp_path))  # refused before anything is retrained
    assert not (tmp_path / "airrep").exists()


# ------------------------------------------------------------------ config and pipeline
def test_score_options_are_checked_and_change_the_right_fingerprints() -> None:
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="did you mean 'subsets'"):
        load_config(tiny, ["score.scorer=airrep", "score.options={subset: 3}"])
    with pytest.raises(ConfigError, match="takes none"):
        load_config(tiny, ["score.scorer=tracin", "score.options={metric: dot}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'score.options.metric'; known keys: \['normalize', "
                                          r"'q_weight'\]"):
        load_config(tiny, ["score.options={metric: dot}"])  # TRAK's options are its answer options
    with pytest.raises(ConfigError, match="metric"):
        load_config(tiny, ["score.scorer=repsim", "score.options={metric: l2}"])
    with pytest.raises(ConfigError, match="label_aware needs class labels; the 'diffusion' family has none"):
        load_config(ROOT / "configs" / "mnist_ddpm.yaml", ["score.scorer=airrep", "score.options.label_aware=true"])
    trak, repsim = load_config(tiny), load_config(tiny, ["score.scorer=repsim"])
    airrep = load_config(tiny, ["score.scorer=airrep", "score.options={steps: 5, label_aware: false}"])
    aware = load_config(tiny, ["score.scorer=airrep"])  # label-aware by default where labels exist
    other = load_config(tiny, ["score.scorer=repsim", "score.options={module: '0'}"])
    assert feature_fingerprint(repsim) == feature_fingerprint(airrep) != feature_fingerprint(trak)
    assert feature_fingerprint(aware) != feature_fingerprint(airrep)
    assert feature_fingerprint(other) != feature_fingerprint(repsim)  # another module, other features
    assert section_fingerprint(repsim, *FEATURE_SECTIONS) == section_fingerprint(trak, *FEATURE_SECTIONS)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")
def test_airrep_runs_end_to_end_and_resumes_its_retrainings(tmp_path, monkeypatch, capsys) -> None:
    from pipelines.families import classifier as subset_jobs

    run = tmp_path / "run"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(run), "--quiet", "--set", f"data.root={MNIST}",
            "--set", "score.scorer=airrep", "--set",
            "score.options={queries: 30, subsets: 4, subset_epochs: 1, width: 8, hidden: 0, steps: 30}"]
    assert main(args) == 0
    assert "proponents" in capsys.readouterr().out
    train, query = FeatureStore.open(run / "features-train"), FeatureStore.open(run / "features-query")
    spec = json.loads((run / "features-train" / "manifest.json").read_text())["spec"]
    assert spec["representation"] == "1" and spec["label_aware"] == "y"  # the MLP's hidden ReLU, label-aware
    assert train.k == query.k == 10 * 16
    scores = np.load(run / "scores" / "scores.npy")
    assert scores.shape == (20, 300) and np.isfinite(scores).all()
    with np.load(run / "scores" / "topk.npz") as z:
        np.testing.assert_allclose(z["proponent_scores"], -np.sort(-scores, axis=1)[:, :5], rtol=1e-4, atol=1e-6)
    (folder,) = (run / "airrep").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["complete"]) == 4 and manifest["spec"]["m"] == 30 and manifest["spec"]["seed"] != 0
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["disjoint"] and prov["query_ids"] == [300, 329]
    assert [prov["keys"]["queries"][k] for k in ("first", "last")] == ["mnist/train/300", "mnist/train/329"]
    with np.load(run / "scorer" / "state.npz", allow_pickle=False) as z:
        assert z["head.layers.0.weight"].shape == (8, 320) and len(z["loss"]) == 30  # 2 models x 10 x 16

    calls = []
    real = subset_jobs.ClassifierSubsetJob.run
    monkeypatch.setattr(subset_jobs.ClassifierSubsetJob, "run", lambda self, *a: calls.append(1) or real(self, *a))
    del manifest["complete"]["s0002/r00"]  # as if killed before the third retraining was recorded
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(args + ["--from", "index", "--set", "score.options.steps=31"]) == 0
    assert len(calls) == 1  # only the lost retraining is redone
    assert main(["query", "--run", str(run), "--example", "3", "-k", "2"]) == 0
    checks = ["--set", "score.options.steps=31", "--set", "validate.subsets=4", "--set", "validate.plots=false"]
    assert main(["validate", *args[1:], *checks]) == 0  # AirRep is measured from its fitted state
    res = json.loads((run / "validation" / "validation.json").read_text())
    assert set(res["scorers"]) == {"airrep"} and "lds" not in res  # RepSim reads other (label-free) features
