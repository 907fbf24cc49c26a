"""tda.integrations.quanda and TRAK's answer options (tda.scorers.trak_variants).

The wrapper's maths (explanations, self-influence, data and checkpoints) is checked without
quanda against explicit computations; only the Quanda subclass and a Quanda metric need quanda.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import tda
from tda.errors import DataError, MissingDependencyError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.integrations.quanda import AttributorExplainer, checkpoint_states, dataset_tensors
from tda.core.kernel import score_matrix
from tda.scorers import TRAKScorer
from tda.scorers.trak_variants import TRAKVariantScorer


def _quanda():
    import importlib.util

    spec = importlib.util.find_spec("quanda")
    if spec is None or spec.submodule_search_locations is None:  # absent, or benchmarks/quanda.py on the path
        pytest.skip("quanda is not installed (pip install quanda; see pyproject.toml)")
    try:
        import quanda  # noqa: F401
    except Exception as exc:  # a torchvision that cannot load on this torch
        pytest.skip(f"quanda is not importable here: {type(exc).__name__}")
    return quanda


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(24, 6)
    y = torch.randint(0, 3, (24,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    states = []
    for s in range(2):
        torch.manual_seed(100 + s)
        states.append({k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()})
    return model, x, y, states


def _features(rng, m_count=2, n=40, k=8, shift=0.0):
    feats = rng.normal(size=(m_count, n, k)) + shift
    return FeatureBlock(np.arange(n), feats.astype(np.float32), rng.uniform(0.05, 1, (m_count, n)).astype(np.float32))


def _whitened_reference(train: FeatureBlock, query: FeatureBlock, lam: float):
    """Per checkpoint, explicit float64 ``phi_q^T K^-1 phi_i`` and the two quadratic forms."""
    out = []
    for m in range(train.feats.shape[0]):
        phi = train.feats[m].astype(np.float64)
        gram = phi.T @ phi
        kinv = np.linalg.inv(gram + lam * np.mean(np.diag(gram)) * np.eye(gram.shape[0]))
        fq = query.feats[m].astype(np.float64)
        out.append((fq @ kinv @ phi.T, np.einsum("ij,jk,ik->i", fq, kinv, fq),
                    np.einsum("ij,jk,ik->i", phi, kinv, phi)))
    return out


def test_normalized_trak_is_the_cosine_after_whitening():
    rng = np.random.default_rng(0)
    train, query = _features(rng), _features(rng, n=5)
    scorer = TRAKVariantScorer(lambda_rel=0.3, normalize=True).fit(ArrayFeatures(train, [0, 1]))
    got = score_matrix(query, scorer, ArrayFeatures(train, [0, 1]))
    ref = np.mean([cross / np.sqrt(qq[:, None] * tt[None, :])
                   for cross, qq, tt in _whitened_reference(train, query, 0.3)], axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() <= 1 + 1e-5


def test_unweighted_trak_drops_only_q():
    rng = np.random.default_rng(1)
    train, query = _features(rng), _features(rng, n=4)
    source = ArrayFeatures(train, [0, 1])
    plain = score_matrix(query, TRAKVariantScorer(lambda_rel=0.5, q_weight=False).fit(source), source)
    ref = np.mean([cross for cross, _, _ in _whitened_reference(train, query, 0.5)], axis=0)
    np.testing.assert_allclose(plain, ref, rtol=1e-4, atol=1e-5)
    default = score_matrix(query, TRAKVariantScorer(lambda_rel=0.5).fit(source), source)
    trak = score_matrix(query, TRAKScorer(lambda_rel=0.5).fit(source), source)
    np.testing.assert_allclose(default, trak, rtol=1e-5, atol=1e-6)  # the defaults are TRAK
    np.testing.assert_allclose(default, ref * train.q.mean(axis=0)[None, :], rtol=1e-4, atol=1e-5)


def test_attributor_takes_the_trak_options():
    model, x, y, states = _tiny()
    attr = tda.Attributor(model, states, scorer="trak", scorer_options={"normalize": True}, k=16)
    assert isinstance(attr.scorer, TRAKVariantScorer) and attr.scorer.normalize
    scores = attr.fit((x, y)).scores((x[:3], y[:3]))
    assert scores.shape == (3, 24) and np.abs(scores).max() <= 1 + 1e-5
    assert attr.scorer.hyperparameters()["normalize"] is True


def test_explain_is_the_attributor_scores_and_explicit_graddot():
    model, x, y, states = _tiny()
    data = torch.utils.data.TensorDataset(x, y)
    explainer = AttributorExplainer(model, data, checkpoints=states, scorer="graddot", k=16)
    targets = torch.tensor([2, 0, 1, 1])
    got = explainer.explain(x[:4], targets)
    assert got.dtype == torch.float32 and got.shape == (4, 24)
    attr = tda.Attributor(model, states, scorer="graddot", k=16).fit({"x": x, "y": y})
    np.testing.assert_allclose(got.numpy(), attr.scores({"x": x[:4], "y": targets}), rtol=1e-5, atol=1e-6)
    train = attr.featurize({"x": x, "y": y}).feats.astype(np.float64)  # explicit (1/M) sum_m <phi_q, phi_i>
    query = attr.featurize({"x": x[:4], "y": targets}).feats.astype(np.float64)
    ref = np.einsum("mqk,mik->qi", query, train) / len(states)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_self_influence_is_the_loss_self_influence_rescaled():
    model, x, y, states = _tiny(1)
    explainer = AttributorExplainer(model, torch.utils.data.TensorDataset(x, y), checkpoints=states,
                                    scorer="graddot", k=16)
    block = explainer.attributor.featurize({"x": x, "y": y})
    feats, q = block.feats.astype(np.float64), block.q.astype(np.float64)
    ref = np.mean((q ** 2) * np.einsum("mik,mik->mi", feats, feats), axis=0)  # (1/M) sum_m ||Q grad f||^2
    np.testing.assert_allclose(explainer.raw_self_influence(), ref, rtol=1e-4)
    scaled = explainer.self_influence().numpy().astype(np.float64)
    np.testing.assert_allclose(scaled, ref * (24 ** 2 / ref.max()), rtol=1e-4)
    assert np.array_equal(np.argsort(-scaled, kind="stable"), np.argsort(-ref, kind="stable"))


def test_dataset_and_checkpoints():
    model, x, y, states = _tiny()
    got = dataset_tensors(torch.utils.data.TensorDataset(x, y), batch_size=5)
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)
    with pytest.raises(DataError, match="pairs"):
        dataset_tensors(torch.utils.data.TensorDataset(x, y, y))
    assert checkpoint_states(model, None, None)[0]["0.weight"].shape == (5, 6)
    calls = []

    def load(module, item):
        calls.append(item)
        module.load_state_dict(states[item])

    loaded = checkpoint_states(model, [1, 0], load)
    assert calls == [1, 0] and torch.equal(loaded[0]["2.bias"], states[1]["2.bias"])


def test_missing_quanda_names_the_install(monkeypatch):
    import tda.integrations.quanda as module

    monkeypatch.setitem(sys.modules, "quanda", None)
    monkeypatch.setitem(sys.modules, "quanda.explainers", None)
    monkeypatch.setattr(module, "_BUILT", {})
    with pytest.raises(MissingDependencyError, match="pip install quanda"):
        module.TDAExplainer  # noqa: B018


def test_quanda_explainer_and_metric():
    quanda = _quanda()
    from tda.integrations.quanda import TDAExplainer

    model, x, y, states = _tiny()
    data = torch.utils.data.TensorDataset(x, y)
    explainer = TDAExplainer(model=model, train_dataset=data, checkpoints=states, scorer="tracin", k=16)
    assert isinstance(explainer, quanda.explainers.Explainer)
    core = AttributorExplainer(model, data, checkpoints=states, scorer="tracin", k=16)
    np.testing.assert_allclose(explainer.explain(x[:5], y[:5]).numpy(), core.explain(x[:5], y[:5]).numpy(),
                               rtol=1e-5, atol=1e-6)
    metric = quanda.metrics.heuristics.TopKCardinalityMetric(model=model, train_dataset=data)
    metric.update(explainer.explain(x[:5], y[:5]))
    assert 0 < metric.compute()["score"] <= 1


def test_config_score_options_build_the_trak_variant():
    from pathlib import Path

    from pipelines.config import load_config
    from pipelines.methods.scorers import build_scorer
    from tda.errors import ConfigError

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    plain = build_scorer(load_config(tiny, ["score.scorer=trak"]))
    assert type(plain) is TRAKScorer
    variant = build_scorer(load_config(tiny, ["score.scorer=trak", "score.options={normalize: true}"]))
    assert isinstance(variant, TRAKVariantScorer) and variant.normalize and variant.q_weight
    with pytest.raises(ConfigError, match="score.options"):
        build_scorer(load_config(tiny, ["score.scorer=trak", "score.options={normalise: true}"]))
