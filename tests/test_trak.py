"""TRAK (docs/methods.md section 3) against the explicit float64 formula and against `traker`."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipelines.families.training import train_classifier
from tda.errors import ConfigError, ShapeError, TDAError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.featurizers.gradient import Featurizer
from tda.core.kernel import score_matrix
from tda.models.reference import mlp
from tda.scorers import TRAKScorer, make_scorer
from tda.models.tasks import ClassificationTask


def _random_features(rng: np.random.Generator, m_count: int, n: int, k: int) -> FeatureBlock:
    scales = rng.uniform(0.5, 3.0, size=(m_count, 1, 1))  # checkpoints of different scale
    feats = (rng.standard_normal((m_count, n, k)) * scales).astype(np.float32)
    q = rng.uniform(0.05, 0.95, size=(m_count, n)).astype(np.float32)
    return FeatureBlock(np.arange(n) + 100, feats, q)


def _trak_reference(train: FeatureBlock, query: FeatureBlock, lambda_rel: float) -> np.ndarray:
    """docs/methods.md section 3 in float64 with an explicit inverse: (m, n) scores."""
    m_count, _, k = train.feats.shape
    num = 0.0
    for m in range(m_count):
        phi = train.feats[m].astype(np.float64)  # (n, k)
        xtx = phi.T @ phi
        lam = lambda_rel * np.mean(np.diag(xtx))
        num = num + phi @ np.linalg.inv(xtx + lam * np.eye(k)) @ query.feats[m].astype(np.float64).T
    num = num / m_count  # (n, m)
    qbar = train.q.astype(np.float64).mean(axis=0)  # (n,)
    return (num * qbar[:, None]).T


def _fit(train: FeatureBlock, lambda_rel: float) -> tuple[TRAKScorer, ArrayFeatures]:
    source = ArrayFeatures(train, list(range(train.feats.shape[0])))
    return TRAKScorer(lambda_rel=lambda_rel, block_rows=16).fit(source), source


@pytest.mark.parametrize(("n", "k", "lambda_rel", "tol"),
                         [(60, 12, 1e-2, 1e-5), (60, 12, 0.5, 1e-5), (10, 32, 1e-2, 2e-4)])
def test_scores_equal_explicit_float64_formula(rng, n: int, k: int, lambda_rel: float, tol: float) -> None:
    """tol is relative to the largest score; k >= n costs precision (see the next test)."""
    train = _random_features(rng, 3, n, k)
    query = _random_features(rng, 3, 7, k)
    scorer, source = _fit(train, lambda_rel)
    got = score_matrix(query, scorer, source, block_rows=13)
    ref = _trak_reference(train, query, lambda_rel)
    assert got.shape == (7, n) and got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tol * np.abs(ref).max())
    f64 = train.feats.astype(np.float64)
    mean_diag = np.einsum("mbk,mbk->m", f64, f64) / k  # mean(diag(Phi^T Phi)) per checkpoint
    np.testing.assert_allclose(scorer.lambdas, lambda_rel * mean_diag, rtol=1e-10)
    assert np.all(np.isfinite(scorer.cond)) and np.all(scorer.cond >= 1)


def test_k_at_least_n_is_singular_without_ridge_but_finite_with_it(rng) -> None:
    """With k >= n, K^-1 phi(z) has a component of size ~1/lambda outside the span of the
    training features that cancels only exactly; the float32 transforms keep the error near
    eps32 / lambda_rel of the largest score (measured: 4e-5 at 1e-2, 7e-4 at 1e-3)."""
    train = _random_features(rng, 3, 8, 40)  # Phi^T Phi has rank 8 < k = 40
    assert np.linalg.matrix_rank(train.feats[0].T.astype(np.float64) @ train.feats[0]) == 8
    query = _random_features(rng, 3, 5, 40)
    scorer, source = _fit(train, 1e-3)
    got = score_matrix(query, scorer, source)
    assert np.isfinite(got).all()
    ref = _trak_reference(train, query, 1e-3)
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3 * np.abs(ref).max())


def test_self_influence_is_positive(rng) -> None:
    """Sign convention: a training example raises its own output (K^-1 is positive definite)."""
    train = _random_features(rng, 3, 30, 8)
    scorer, source = _fit(train, 1e-2)
    self_scores = np.diag(score_matrix(train, scorer, source))
    assert np.all(self_scores > 0)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_nonpositive_lambda_raises(bad: float) -> None:
    with pytest.raises(ConfigError, match="lambda_rel must be 'auto' or a positive finite number"):
        TRAKScorer(lambda_rel=bad)
    with pytest.raises(ConfigError, match="lambda_rel must be 'auto' or a positive"):
        make_scorer("trak", lambda_rel=bad)


def test_auto_ridge_reaches_the_target_effective_dimension_and_is_recorded() -> None:
    from tda.scorers.trak import auto_df

    rng = np.random.default_rng(0)
    n, k, m = 300, 40, 3
    scales = np.geomspace(10, 0.01, k)  # a decaying spectrum
    feats = rng.standard_normal((m, n, k)) * scales
    src = ArrayFeatures(FeatureBlock(np.arange(n), feats, rng.uniform(0.1, 1, (m, n))), range(m))
    scorer = TRAKScorer().fit(src)  # the default is "auto"
    assert scorer.lambda_rel == "auto"
    for c in range(m):
        s = np.linalg.eigvalsh(feats[c].T @ feats[c])  # explicit float64 spectrum
        nuclear, frob = np.linalg.norm(feats[c], "nuc"), np.linalg.norm(feats[c], "fro")
        spread_rule = 0.95 * m ** 0.43 * k ** 0.25 * nuclear / frob  # sqrt(spread) = ||Phi||_* / ||Phi||_F
        outside_top = 1 - s.max() / s.sum()  # the trace outside the top direction
        target = min(max(spread_rule * outside_top, 1.0), 0.6 * k)
        assert scorer.target_df[c] == pytest.approx(target, rel=1e-6)
        assert abs(np.sum(s / (s + scorer.lambdas[c])) - target) < 1e-6 * k
        np.testing.assert_allclose(scorer.chosen_lambda_rel[c], scorer.lambdas[c] / np.mean(s), rtol=1e-6)
    hp = scorer.hyperparameters()
    assert hp["lambda_rel"] == "auto" and len(hp["chosen_lambda_rel"]) == m and "effective dimension" in hp["lambda_rule"]
    assert len(hp["target_df"]) == m
    fixed = TRAKScorer(lambda_rel=float(scorer.chosen_lambda_rel[0])).fit(src)
    assert np.isclose(fixed.lambdas[0], scorer.lambdas[0])  # a fixed value reproduces a chosen one
    state = scorer.state_dict()
    again = TRAKScorer().load_state_dict(state)
    np.testing.assert_array_equal(again.chosen_lambda_rel, scorer.chosen_lambda_rel)
    with pytest.raises(ConfigError, match="lambda_rel=auto"):
        TRAKScorer(lambda_rel=0.1).load_state_dict(state)
    flat = torch.ones(1, 1024, dtype=torch.float64)  # spread 1024: every direction carries as much
    steep = torch.from_numpy(np.geomspace(1e4, 1e-4, 1024))[None]  # a few directions dominate
    assert float(auto_df(steep, 1)) < float(auto_df(flat, 1))
    assert float(auto_df(flat, 1)) < float(auto_df(flat, 5)) <= 0.6 * 1024
    assert float(auto_df(torch.ones(1, 64, dtype=torch.float64), 10)) == pytest.approx(0.6 * 64)  # capped


def test_unknown_scorer_name_raises() -> None:
    with pytest.raises(ConfigError, match="unknown scorer 'trac'"):
        make_scorer("trac")


def test_large_lambda_tends_to_gradient_dot_products(rng, spearman_rows) -> None:
    train = _random_features(rng, 1, 80, 16)
    train.q[:] = 1.0
    query = _random_features(rng, 1, 6, 16)
    dots = query.feats[0].astype(np.float64) @ train.feats[0].astype(np.float64).T  # (6, 80)
    big, source = _fit(train, 1e6)
    scores = score_matrix(query, big, source)
    assert spearman_rows(scores, dots).min() > 0.9999
    # and proportional, with factor 1 / lambda
    np.testing.assert_allclose(scores * big.lambdas[0], dots, rtol=1e-3, atol=1e-4 * np.abs(dots).max())
    # a small ridge really whitens (otherwise the check above would be vacuous)
    small, _ = _fit(train, 1e-3)
    assert spearman_rows(score_matrix(query, small, source), dots).mean() < 0.99


def test_state_dict_round_trip(rng, tmp_path) -> None:
    train = _random_features(rng, 3, 40, 10)
    query = _random_features(rng, 3, 4, 10)
    scorer, source = _fit(train, 2e-2)
    expected = score_matrix(query, scorer, source)
    path = tmp_path / "trak.npz"
    np.savez(path, **scorer.state_dict())
    with np.load(path, allow_pickle=False) as saved:
        state = dict(saved)
    restored = TRAKScorer(lambda_rel=2e-2).load_state_dict(state)
    assert np.array_equal(score_matrix(query, restored, source), expected)
    with pytest.raises(ConfigError, match="saved TRAK state used lambda_rel=0.02"):
        TRAKScorer(lambda_rel=1e-2).load_state_dict(state)
    with pytest.raises(TDAError, match=r"missing \['chol'\]"):
        TRAKScorer(lambda_rel=2e-2).load_state_dict({k: v for k, v in state.items() if k != "chol"})


def test_misuse_raises(rng) -> None:
    train = _random_features(rng, 3, 20, 6)
    with pytest.raises(TDAError, match="not fitted"):
        TRAKScorer().transform_query(train)
    with pytest.raises(TDAError, match="nothing to save"):
        TRAKScorer().state_dict()
    scorer, _ = _fit(train, 1e-2)
    with pytest.raises(ShapeError, match="k=7"):
        scorer.transform_query(_random_features(rng, 3, 2, 7))
    with pytest.raises(ShapeError, match="2 checkpoints"):
        scorer.transform_train(_random_features(rng, 2, 2, 6))
    zeros = FeatureBlock(np.arange(5), np.zeros((1, 5, 4), np.float32), np.ones((1, 5), np.float32))
    with pytest.raises(TDAError, match="all zero"):
        TRAKScorer().fit(ArrayFeatures(zeros, [0]))


# --------------------------------------------------------------------------------------------
# Agreement with traker (the reference implementation by the method's authors).

N_TRAIN, N_QUERY = 300, 20


def _train_checkpoints(in_dim: int, hidden: int, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    ckpts = []
    for seed in range(3):
        model = train_classifier(lambda: mlp(in_dim, (hidden,), 3), x, y, epochs=5, lr=0.05,
                                 batch_size=32, seed=seed)
        ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return ckpts


def _tda_features(featurizer: Featurizer, ckpts: list[dict], x: torch.Tensor, y: torch.Tensor) -> FeatureBlock:
    feats, qs = [], []
    for c, state in enumerate(ckpts):
        ((_, phi, q),) = featurizer.featurize(state, c, [(np.arange(len(x)), {"x": x, "y": y})])
        feats.append(phi)
        qs.append(q)
    return FeatureBlock(np.arange(len(x)), np.stack(feats), np.stack(qs))


def _traker_scores(save_dir, in_dim: int, hidden: int, ckpts: list[dict], data, k: int,
                   lambda_reg: float, projector=None) -> np.ndarray:
    """traker's TRAK scores, transposed to our (n_query, n_train) layout."""
    from trak import TRAKer

    xtr, ytr, xq, yq = data
    traker = TRAKer(model=mlp(in_dim, (hidden,), 3), task="image_classification",
                    train_set_size=len(xtr), save_dir=str(save_dir), device="cpu",
                    use_half_precision=False, proj_dim=k, lambda_reg=lambda_reg,
                    projector=projector, logging_level=logging.WARNING)
    for c, state in enumerate(ckpts):
        traker.load_checkpoint(state, model_id=c)
        traker.featurize(batch=(xtr, ytr), num_samples=len(xtr))
    traker.finalize_features()
    for c, state in enumerate(ckpts):
        traker.start_scoring_checkpoint("queries", state, model_id=c, num_targets=len(xq))
        traker.score(batch=(xq, yq), num_samples=len(xq))
    return np.asarray(traker.finalize_scores("queries")).T  # traker returns (n_train, n_query)


def _data(tiny_data, in_dim: int):
    x, y = tiny_data(N_TRAIN + N_QUERY, in_dim=in_dim, classes=3, seed=7)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def test_agrees_with_traker_at_the_exact_gradient_limit(tiny_data, spearman_rows, tmp_path) -> None:
    """d = 115 < n = 300 and k = 256 >= d: with a small ridge both libraries approach
    g_i^T (G^T G)^+ g(z), which no longer depends on the random projection, so traker's own
    (Gaussian) projector and ours (Rademacher) must give the same ranking."""
    pytest.importorskip("trak")
    in_dim, hidden, k, lambda_rel = 10, 8, 256, 1e-4
    data = _data(tiny_data, in_dim)
    ckpts = _train_checkpoints(in_dim, hidden, data[0], data[1])
    featurizer = Featurizer(mlp(in_dim, (hidden,), 3), ClassificationTask(), k=k, seed=0)
    assert featurizer.dim == 115
    train = _tda_features(featurizer, ckpts, *data[:2])
    query = _tda_features(featurizer, ckpts, *data[2:])
    scorer, source = _fit(train, lambda_rel)
    ours = score_matrix(query, scorer, source)
    theirs = _traker_scores(tmp_path, in_dim, hidden, ckpts, data, k, float(scorer.lambdas.mean()))
    assert theirs.shape == ours.shape == (N_QUERY, N_TRAIN)
    rho = spearman_rows(ours, theirs)
    assert rho.mean() > 0.99 and rho.min() > 0.98, rho  # observed: mean 0.9999
    # same sign convention: positive scores agree in sign, not just in rank
    assert np.mean(np.sign(ours) == np.sign(theirs)) > 0.97


def test_agrees_with_traker_given_the_same_projection(tiny_data, spearman_rows, tmp_path) -> None:
    """d = 387 > n = 300: the scores depend on the projection, so traker is handed our matrix.
    What remains different is traker's single absolute ridge for all checkpoints and its
    rescaling of each (Phi^T Phi + lambda I)^-1 by its mean absolute entry (which reweights
    the checkpoints of the ensemble); for one checkpoint the scores are equal up to that
    factor."""
    pytest.importorskip("trak")
    from trak.projectors import AbstractProjector
    from trak.utils import vectorize

    class OurProjector(AbstractProjector):
        def __init__(self, projector) -> None:
            super().__init__(projector.dim, projector.k, projector.seed, "rademacher", "cpu")
            self.inner = projector

        def project(self, grads, model_id: int) -> torch.Tensor:
            if isinstance(grads, dict):
                grads = vectorize(grads, device="cpu")
            return self.inner.project(grads.float(), model_id) * self.inner.dim ** 0.5  # traker divides

        def free_memory(self) -> None:
            pass

    in_dim, hidden, k, lambda_rel = 20, 16, 512, 1e-2
    data = _data(tiny_data, in_dim)
    ckpts = _train_checkpoints(in_dim, hidden, data[0], data[1])
    featurizer = Featurizer(mlp(in_dim, (hidden,), 3), ClassificationTask(), k=k, seed=0)
    assert featurizer.dim == 387
    train = _tda_features(featurizer, ckpts, *data[:2])
    query = _tda_features(featurizer, ckpts, *data[2:])

    scorer, source = _fit(train, lambda_rel)
    ours = score_matrix(query, scorer, source)
    theirs = _traker_scores(tmp_path / "m3", in_dim, hidden, ckpts, data, k,
                            float(scorer.lambdas.mean()), OurProjector(featurizer.projector))
    rho = spearman_rows(ours, theirs)
    assert rho.mean() > 0.99 and rho.min() > 0.98, rho  # observed: mean 0.997

    # one checkpoint: identical up to traker's normalisation of the inverse
    one = FeatureBlock(train.ids, train.feats[:1], train.q[:1])
    scorer1, source1 = _fit(one, lambda_rel)
    ours1 = score_matrix(FeatureBlock(query.ids, query.feats[:1], query.q[:1]), scorer1, source1)
    theirs1 = _traker_scores(tmp_path / "m1", in_dim, hidden, ckpts[:1], data, k,
                             float(scorer1.lambdas[0]), OurProjector(featurizer.projector))
    xtx = one.feats[0].astype(np.float64).T @ one.feats[0].astype(np.float64)
    inv_scale = np.abs(np.linalg.inv(xtx + scorer1.lambdas[0] * np.eye(k))).mean()
    np.testing.assert_allclose(theirs1 * inv_scale, ours1, rtol=2e-2,
                               atol=2e-3 * np.abs(ours1).max())


def test_auto_ridge_shrinks_with_a_dominant_direction() -> None:
    """The target's factor of benchmarks/ridge_regimes.py, the trace outside the top direction
    (the same whether n > k or n < k); the target is at least 1."""
    from tda.scorers.trak import auto_df

    rng = np.random.default_rng(1)
    k = 64
    for n in (200, 32):  # n > k, then n < k (rank n)
        g = rng.standard_normal((n, k))
        dominant = g.copy()
        dominant[:, 0] *= 30.0  # one direction holds most of the trace
        for feats in (g, dominant):
            s = np.linalg.eigvalsh(feats.T @ feats)[::-1].copy()
            eig = torch.from_numpy(s)[None]
            spread = np.sqrt(s.clip(min=0)).sum() ** 2 / s.sum()
            want = 0.95 * k ** 0.25 * np.sqrt(spread) * (1 - s[0] / s.sum())
            assert float(auto_df(eig, 1)[0]) == pytest.approx(min(max(want, 1.0), 0.6 * k), rel=1e-9)
        assert float(auto_df(torch.from_numpy(np.linalg.eigvalsh(dominant.T @ dominant))[None], 1)) < \
            float(auto_df(torch.from_numpy(np.linalg.eigvalsh(g.T @ g))[None], 1))
    tiny = torch.tensor([[1.0, 1e-6, 1e-6, 1e-6]])
    assert float(auto_df(tiny, 1)[0]) == 1.0  # one direction: the floor
