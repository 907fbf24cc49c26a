"""TracInCP, Grad-Dot and Grad-Cos (docs/methods.md section 4) against float64 references."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from stores.index import build_index
from tda.api import Attributor
from tda.data.loading import mnist_collate
from tda.errors import ConfigError, NonFiniteError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import score_matrix, top_k
from tda.models.reference import mlp
from tda.scorers import GradCosScorer, GradDotScorer, Scorer, TracInCPScorer, make_scorer
from tda.models.tasks import ClassificationTask


def _looped_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Exact per-example gradients of the margin, float64, one autograd call per example: (n, d)."""
    model = model.double()
    params = [p for p in model.parameters()]
    task = ClassificationTask()
    rows = []
    for i in range(x.shape[0]):
        f = task.output(model, {"x": x[i : i + 1].double(), "y": y[i : i + 1]}).sum()
        grads = torch.autograd.grad(f, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).numpy()


def _random_block(rng: np.random.Generator, m_count: int, n: int, k: int, first_id: int = 0) -> FeatureBlock:
    scales = rng.uniform(0.5, 3.0, size=(m_count, 1, 1))
    feats = (rng.standard_normal((m_count, n, k)) * scales).astype(np.float32)
    q = rng.uniform(0.05, 0.95, size=(m_count, n)).astype(np.float32)  # ignored by these scorers
    return FeatureBlock(np.arange(n) + first_id, feats, q)


def _cos_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over checkpoints of cosine similarities, float64: (M, m, k), (M, n, k) -> (m, n)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    out = 0.0
    for c in range(a.shape[0]):
        na, nb = np.linalg.norm(a[c], axis=1), np.linalg.norm(b[c], axis=1)
        ua = np.divide(a[c], na[:, None], out=np.zeros_like(a[c]), where=na[:, None] > 0)
        ub = np.divide(b[c], nb[:, None], out=np.zeros_like(b[c]), where=nb[:, None] > 0)
        out = out + ua @ ub.T
    return out / a.shape[0]


def test_tracincp_equals_looped_float64_gradients(make_mlp, tiny_data) -> None:
    """sum_c eta_c <g_c(z), g_c(z_i)> from exact per-example gradients (identity projection)."""
    x, y = tiny_data(26, seed=3)
    xt, yt, xq, yq = x[:20], y[:20], x[20:], y[20:]
    etas = [0.5, 0.1, 0.02]
    train_g, query_g = [], []
    for c in range(len(etas)):
        model = make_mlp(seed=c)
        train_g.append(_looped_grads(model, xt, yt))  # (n, d)
        query_g.append(_looped_grads(model, xq, yq))  # (m, d)
    ref = sum(eta * qg @ tg.T for eta, qg, tg in zip(etas, query_g, train_g))  # (m, n) float64
    train = FeatureBlock(np.arange(20), np.stack(train_g).astype(np.float32), np.ones((3, 20)))
    query = FeatureBlock(np.arange(6), np.stack(query_g).astype(np.float32), np.ones((3, 6)))
    source = ArrayFeatures(train, [0, 1, 2])
    scorer = TracInCPScorer(etas).fit(source)
    got = score_matrix(query, scorer, source, block_rows=7)
    assert got.shape == (6, 20) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert np.all(np.diag(score_matrix(train, scorer, source)) > 0)  # self-influence > 0


def test_tracincp_ignores_q_and_reduces_to_graddot(rng) -> None:
    train, query = _random_block(rng, 2, 15, 6), _random_block(rng, 2, 4, 6)
    source = ArrayFeatures(train, [0, 1])
    tracin = score_matrix(query, TracInCPScorer([0.5, 0.5]), source)
    graddot = score_matrix(query, GradDotScorer(), source)
    np.testing.assert_allclose(tracin, graddot, rtol=1e-5, atol=1e-6)  # sum eta = 1 <-> mean


@pytest.mark.parametrize("etas", [[0.1, 0.2], [0.1, 0.2, 0.3, 0.4]])
def test_tracincp_wrong_number_of_learning_rates_raises(rng, etas: list[float]) -> None:
    train = _random_block(rng, 3, 5, 4)
    scorer = TracInCPScorer(etas)
    with pytest.raises(ConfigError, match="one learning rate per checkpoint"):
        scorer.fit(ArrayFeatures(train, [0, 1, 2]))
    with pytest.raises(ConfigError, match="one learning rate per checkpoint"):
        scorer.transform_query(train)


@pytest.mark.parametrize("etas", [[], [0.1, -0.2], [0.0, 0.0], [float("nan")], [[0.1, 0.2]], "abc"])
def test_tracincp_rejects_bad_learning_rates(etas) -> None:
    with pytest.raises(ConfigError):
        TracInCPScorer(etas)


def test_tracincp_state_round_trip_checks_learning_rates() -> None:
    state = TracInCPScorer([0.1, 0.2]).state_dict()
    TracInCPScorer([0.1, 0.2]).load_state_dict(state)
    with pytest.raises(ConfigError, match="learning rates"):
        TracInCPScorer([0.1, 0.3]).load_state_dict(state)


def test_graddot_equals_numpy_mean_of_dot_products(rng) -> None:
    train, query = _random_block(rng, 3, 30, 8, first_id=50), _random_block(rng, 3, 5, 8)
    got = score_matrix(query, GradDotScorer(), ArrayFeatures(train, [0, 1, 2]), block_rows=11)
    f, g = query.feats.astype(np.float64), train.feats.astype(np.float64)
    ref = np.einsum("cmk,cnk->mn", f, g) / 3
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gradcos_equals_numpy_cosine_in_unit_range(rng) -> None:
    train, query = _random_block(rng, 3, 30, 8), _random_block(rng, 3, 5, 8)
    train.feats[1, 4] = 0.0  # a zero gradient under one checkpoint: cosine 0 there, no NaN
    source = ArrayFeatures(train, [0, 1, 2])
    got = score_matrix(query, GradCosScorer(), source)
    np.testing.assert_allclose(got, _cos_ref(query.feats, train.feats), rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all() and np.abs(got).max() <= 1 + 1e-6
    self_sim = np.diag(score_matrix(train, GradCosScorer(), source))
    expected = np.ones(30)
    expected[4] = 2 / 3  # one of three checkpoints has a zero gradient
    np.testing.assert_allclose(self_sim, expected, atol=1e-6)


def test_gradcos_is_scale_invariant_and_flags_non_finite(rng) -> None:
    train, query = _random_block(rng, 2, 10, 5), _random_block(rng, 2, 3, 5)
    scaled = FeatureBlock(train.ids, train.feats * np.float32(1e3), train.q)
    a = score_matrix(query, GradCosScorer(), ArrayFeatures(train, [0, 1]))
    b = score_matrix(query, GradCosScorer(), ArrayFeatures(scaled, [0, 1]))
    np.testing.assert_allclose(a, b, atol=1e-6)
    train.feats[0, 2, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"ids \[2\]"):
        GradCosScorer().transform_train(train)


def test_fp16_features_do_not_overflow_the_norm(rng) -> None:
    block = FeatureBlock(np.arange(3), np.full((1, 3, 64), 6e4, dtype=np.float16), np.ones((1, 3)))
    out = GradCosScorer().transform_query(block)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


SCORERS: dict[str, Callable[[int], Scorer]] = {
    "tracin": lambda m: make_scorer("tracin", learning_rates=[0.3] * m),
    "graddot": lambda m: make_scorer("graddot"),
    "gradcos": lambda m: make_scorer("gradcos"),
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_faiss_top_k_equals_brute_force(rng, name: str) -> None:
    train, query = _random_block(rng, 2, 40, 6, first_id=1000), _random_block(rng, 2, 4, 6)
    source = ArrayFeatures(train, [0, 1])
    scorer = SCORERS[name](2).fit(source)
    assert scorer.name == name
    brute = score_matrix(query, scorer, source)  # (m, n)
    id_col = {int(i): j for j, i in enumerate(train.ids)}
    got = build_index(source, scorer, block_rows=9).top_k(scorer.transform_query(query), 5)
    exact = top_k(query, scorer, source, k=5)
    srt = np.sort(brute, axis=1)
    tol = 1e-5 * np.abs(brute).max()
    np.testing.assert_allclose(got.proponent_scores, srt[:, ::-1][:, :5], atol=tol)
    np.testing.assert_allclose(got.opponent_scores, srt[:, :5], atol=tol)
    np.testing.assert_allclose(exact.proponent_scores, got.proponent_scores, atol=tol)
    for ids, scores in ((got.proponent_ids, got.proponent_scores), (got.opponent_ids, got.opponent_scores)):
        cols = np.vectorize(id_col.__getitem__)(ids)  # ids are training ids, tie-tolerant check
        np.testing.assert_allclose(np.take_along_axis(brute, cols, axis=1), scores, atol=tol)


def test_registry_builds_every_scorer() -> None:
    assert isinstance(make_scorer("tracin", learning_rates=[1.0]), TracInCPScorer)
    tracin = make_scorer("tracin", learning_rates=[0.1, 0.2])
    assert tracin.hyperparameters() == {"learning_rates": [0.1, 0.2]}
    assert isinstance(make_scorer("graddot"), GradDotScorer)
    assert isinstance(make_scorer("gradcos"), GradCosScorer)
    assert make_scorer("repsim", metric="dot").hyperparameters() == {"metric": "dot"}
    with pytest.raises(ConfigError, match="gradcos"):
        make_scorer("grad-cos")


def _tiny_mnist(rng: np.random.Generator, n: int, first_id: int):
    import datasets

    images = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
    return datasets.Dataset.from_dict({
        "id": list(range(first_id, first_id + n)),
        "image": [row.tolist() for row in images],
        "label": rng.integers(0, 10, size=n).tolist(),
    })


def test_attributor_end_to_end_with_gradcos(rng) -> None:
    train, query = _tiny_mnist(rng, 24, first_id=100), _tiny_mnist(rng, 5, first_id=0)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(mlp(784, (8,), 10).state_dict())
    torch.manual_seed(0)
    attr = Attributor(mlp(784, (8,), 10), ckpts, collate=mnist_collate, scorer=GradCosScorer(),
                      k=16, batch_size=10)
    attr.fit(train)
    scores = attr.scores(query)
    assert scores.shape == (5, 24) and np.isfinite(scores).all()
    assert np.abs(scores).max() <= 1 + 1e-5
    ref = _cos_ref(attr.featurize(query).feats, attr.train_features.block.feats)
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    own = attr.top_k(train.select(range(4)), k=1)  # an example is its own top proponent
    np.testing.assert_array_equal(own.proponent_ids[:, 0], [100, 101, 102, 103])
    np.testing.assert_allclose(own.proponent_scores[:, 0], 1.0, atol=1e-5)
