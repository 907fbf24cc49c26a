"""EK-FAC influence (tda.scorers.ekfac.factors): float64 checks against explicit per-layer matrices built from
looped (vmap) per-example cross-entropy gradients, the factored projection against the exact
features, kronfluence on the same model and data, and bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from tda.scorers.ekfac.factors import EKFACFactors
from tda.scorers.ekfac.features import EKFACAttributor, EKFACQueryFeaturizer, ekfac_featurizers
from tda.errors import CheckpointError, ConfigError, NonFiniteError, ShapeError, TDAError
from tda.featurizers.factored import capture_layers
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import score_matrix
from tda.scorers import EKFACScorer, make_scorer
from tda.models.tasks import ClassificationTask, Task, classification_margin


#: The task's loss weight Q = 1 - p_y (which turns f-gradients into loss gradients) is computed in
#: float32 by tda.models.tasks, so float64 factors match the looped CE references to ~1e-7, not 1e-12.
_Q_RTOL = 1e-6


def _tiny(seed: int = 0, dims: tuple[int, int, int] = (5, 4, 3), dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.Tanh(), nn.Linear(dims[1], dims[2])).to(dtype).eval()


def _cnn(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)).to(dtype).eval()


def _data(n: int, in_shape: tuple[int, ...] = (5,), classes: int = 3, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *in_shape, generator=gen, dtype=dtype), torch.randint(0, classes, (n,), generator=gen)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 7):
    return lambda: [(np.arange(lo, min(lo + size, len(x))), {"x": x[lo: lo + size], "y": y[lo: lo + size]})
                    for lo in range(0, len(x), size)]


def _layer_grads(model: nn.Module, scalar, x: torch.Tensor, y: torch.Tensor, factors: EKFACFactors) -> list:
    """Per layer (n, d_out, d_in) per-example gradients of ``scalar(logits, y)`` (vmap), bias column last."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return scalar(functional_call(model, p, (xi[None],)), yi[None]).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    out = []
    for s in factors.layers:
        w = g[f"{s.name}.weight"].reshape(len(x), s.d_out, -1)
        out.append(torch.cat([w, g[f"{s.name}.bias"][:, :, None]], dim=2))
    return out


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def _features(featurizer, model: nn.Module, batches) -> FeatureBlock:
    rows = list(featurizer.featurize(model.state_dict(), 0, batches()))
    return FeatureBlock(np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])[None],
                        np.concatenate([r[2] for r in rows])[None])


def _query_features(model, factors, x, y) -> torch.Tensor:
    """Exact (identity-projection) preconditioned query gradients, (m, sum_L d_out d_in) float64."""
    feat = EKFACQueryFeaturizer(model, ClassificationTask(), factors, None, None)
    return feat.project(capture_layers(model, feat.task, {"x": x, "y": y}, feat.layers), 0)


def _kron_basis(f) -> torch.Tensor:
    """K with vec_row(Q_S X Q_A^T) = K vec_row(X)."""
    return torch.kron(f.q_s, f.q_a)


# --------------------------------------------------------------- 1. exact references, float64
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_correction_and_preconditioner_equal_explicit_eigenbasis_inverse(arch: str) -> None:
    """Lambda = diag(K^T F K) with F = E[vec(G) vec(G)^T] (looped CE gradients), and the
    preconditioned query gradient is exactly (K diag(Lambda + lambda) K^T)^-1 vec(G_z)."""
    model, shape = (_tiny(), (5,)) if arch == "mlp" else (_cnn(), (2, 4, 4))
    x, y = _data(20, shape)
    task = ClassificationTask()
    factors = EKFACFactors.fit_batches(model, task, _batches(x, y), [model.state_dict()], fisher="empirical")
    grads = _layer_grads(model, _ce, x, y, factors)
    queries = _query_features(model, factors, x[:5], y[:5])
    fq = _layer_grads(model, classification_margin, x[:5], y[:5], factors)
    lo, exact = 0, []
    for f, g, gz in zip(factors.factors[0], grads, fq):
        flat = g.reshape(len(x), -1)
        fisher = flat.T @ flat / len(x)
        basis = _kron_basis(f)
        lam = torch.diagonal(basis.T @ fisher @ basis).reshape(f.lam.shape)
        torch.testing.assert_close(f.lam, lam, rtol=_Q_RTOL, atol=1e-14)
        assert f.damping == pytest.approx(0.1 * float(lam.mean()), rel=_Q_RTOL)
        h = basis @ torch.diag((f.lam + f.damping).reshape(-1)) @ basis.T
        solved = torch.linalg.solve(h, gz.reshape(5, -1).T).T  # (m, d_L)
        torch.testing.assert_close(queries[:, lo: lo + solved.shape[1]], solved, rtol=1e-8, atol=1e-10)
        exact.append(solved @ (-flat).T)  # grad f(z)^T H^-1 (-grad L_i)
        lo += solved.shape[1]
    assert lo == queries.shape[1]
    train, query = ekfac_featurizers(model, task, factors, None, None)
    tr = ArrayFeatures(_features(train, model, _batches(x, y)), [0])
    scores = score_matrix(_features(query, model, _batches(x[:5], y[:5])), EKFACScorer().fit(tr), tr)
    np.testing.assert_allclose(scores, sum(exact).numpy(), rtol=2e-4, atol=1e-4 * np.abs(scores).max())
    assert (np.diag(scores) > 0).all()  # self-influence: training on z raises f(z) (H is positive definite)


def test_eigenbases_diagonalise_the_covariances() -> None:
    model = _tiny()
    x, y = _data(20)
    factors = EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y), [model.state_dict()],
                                       fisher="empirical")
    grads = _layer_grads(model, _ce, x, y, factors)
    inputs = [x, torch.tanh(model[0](x)).detach()]
    for f, g, a in zip(factors.factors[0], grads, inputs):
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
        delta = g[:, :, -1]  # one position: the bias column of G_i = delta a^T is delta
        for q, cov in ((f.q_a, a.T @ a / len(a)), (f.q_s, delta.T @ delta / len(a))):
            rot = q.T @ cov @ q  # the reference's float64 Q differs from the task's float32 Q by ~1e-7
            torch.testing.assert_close(rot - torch.diag(torch.diagonal(rot)), torch.zeros_like(rot), rtol=0,
                                       atol=_Q_RTOL * float(cov.abs().max()))


def test_one_training_example_gives_the_exact_damped_fisher_inverse() -> None:
    """With one example G = delta a^T is rank one and diagonal in the Kronecker eigenbasis, so
    EK-FAC equals (F + lambda I)^-1 exactly per layer (F = vec(G) vec(G)^T)."""
    model = _tiny()
    x, y = _data(6)
    factors = EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x[:1], y[:1]), [model.state_dict()],
                                       fisher="empirical")
    g = _layer_grads(model, _ce, x[:1], y[:1], factors)
    gz = _layer_grads(model, classification_margin, x[1:], y[1:], factors)
    got, lo = _query_features(model, factors, x[1:], y[1:]), 0
    for f, gi, q in zip(factors.factors[0], g, gz):
        v = gi.reshape(-1)
        h = torch.outer(v, v) + f.damping * torch.eye(len(v), dtype=v.dtype)
        want = torch.linalg.solve(h, q.reshape(len(q), -1).T).T
        torch.testing.assert_close(got[:, lo: lo + len(v)], want, rtol=_Q_RTOL, atol=_Q_RTOL * float(want.abs().max()))
        lo += len(v)


def test_expected_fisher_is_ekfac_of_the_gauss_newton_matrix_and_tracks_its_inverse() -> None:
    """fisher='expected': Lambda = diag(K^T GN K) exactly for the explicit GN block
    GN_L = E[J^T (diag p - p p^T) J] (J = d logits / d W_L by jacrev). Against the explicit damped
    block-diagonal GN inverse (same damping), EK-FAC's pairwise scores on the tiny model reach
    Spearman > 0.95 and a relative Frobenius error < 0.35 (measured here 0.972, 0.268; over
    seeds 0-2 and n = 20, 50, 100: 0.97-0.99 and 0.14-0.29), far closer than plain gradient
    dot products (no preconditioner; Spearman 0.76 here, 0.66-0.78 over those runs)."""
    model = _tiny()
    x, y = _data(20)
    factors = EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y), [model.state_dict()],
                                       fisher="expected")
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))(params, x)
    probs = torch.softmax(model(x), dim=1).detach()
    hess = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # (n, C, C)
    loss_g = _layer_grads(model, _ce, x, y, factors)
    fz = _layer_grads(model, classification_margin, x[:8], y[:8], factors)
    ours, exact, dot = 0, 0, 0
    for s, f, g, gz in zip(factors.layers, factors.factors[0], loss_g, fz):
        j = torch.cat([jac[f"{s.name}.weight"].reshape(20, 3, s.d_out, -1), jac[f"{s.name}.bias"][..., None]], dim=3)
        j = j.reshape(20, 3, -1)  # (n, C, d_L)
        gn = torch.einsum("ncd,nce,nef->df", j, hess, j) / 20
        basis = _kron_basis(f)
        torch.testing.assert_close(f.lam, torch.diagonal(basis.T @ gn @ basis).reshape(f.lam.shape), rtol=_Q_RTOL,
                                   atol=1e-14)
        q, train = gz.reshape(8, -1), -g.reshape(20, -1).T
        exact = exact + torch.linalg.solve(gn + f.damping * torch.eye(len(gn), dtype=gn.dtype), q.T).T @ train
        h = basis @ torch.diag((f.lam + f.damping).reshape(-1)) @ basis.T
        ours = ours + torch.linalg.solve(h, q.T).T @ train
        dot = dot + q @ train
    rho = spearmanr(ours.reshape(-1), exact.reshape(-1)).statistic
    rel = float((ours - exact).norm() / exact.norm())
    assert rho > 0.95 and rel < 0.35, (rho, rel)
    assert rho > spearmanr(dot.reshape(-1), exact.reshape(-1)).statistic + 0.1


def test_sampled_fisher_is_seeded_and_approaches_the_expected_one() -> None:
    model = _tiny()
    x, y = _data(20)
    fit = lambda **kw: EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y, 20),  # noqa: E731
                                                [model.state_dict()], **kw)
    a, b = fit(fisher="sampled", samples=3, seed=5), fit(fisher="sampled", samples=3, seed=5)
    assert all(torch.equal(p.lam, q.lam) for p, q in zip(a.factors[0], b.factors[0]))
    many, expected = fit(fisher="sampled", samples=400), fit(fisher="expected")
    for p, q in zip(many.factors[0], expected.factors[0]):
        assert float((p.lam - q.lam).norm() / q.lam.norm()) < 0.15


def test_attributor_end_to_end_matches_the_featurizer_path() -> None:
    datasets = pytest.importorskip("datasets")
    model = _tiny()
    x, y = _data(20)
    rows = datasets.Dataset.from_dict({"x": x.numpy().tolist(), "y": y.numpy()})

    def collate(cols):
        return {"x": torch.as_tensor(np.asarray(cols["x"], dtype=np.float64)), "y": torch.as_tensor(cols["y"])}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    attr = EKFACAttributor(model, [model.state_dict(), _tiny(seed=2).state_dict()], collate, k_in=None, k_out=None,
                           fisher="expected", batch_size=7).fit(rows)
    got = attr.scores(rows.select(range(4)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    want = 0
    for c, m in enumerate((model, _tiny(seed=2))):
        f = EKFACFactors.fit_batches(m, ClassificationTask(), _batches(x, y), [m.state_dict()], fisher="expected")
        train, query = ekfac_featurizers(m, ClassificationTask(), f, None, None)
        tr = ArrayFeatures(_features(train, m, _batches(x, y)), [0])
        want = want + score_matrix(_features(query, m, _batches(x[:4], y[:4])), EKFACScorer().fit(tr), tr) / 2
        assert attr.factors.factors[c][0].damping == pytest.approx(f.factors[0][0].damping)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    top = attr.top_k(rows.select(range(4)), k=3)
    np.testing.assert_array_equal(top.proponent_ids[:, 0], got.argmax(axis=1))


# --------------------------------------------------------------- 2. factored projection
def test_both_sides_use_the_same_factored_projection() -> None:
    """Train features are ``c_L P_out^T G_i P_in``, query features ``s_L P_out^T (H_L^-1 G_z) P_in``
    with the same P (float64, explicit), and ``s_L c_L = 1 / (k_in k_out)``: the projected score
    estimates the exact one without rescaling."""
    model = _tiny()
    x, y = _data(12)
    task = ClassificationTask()
    factors = EKFACFactors.fit_batches(model, task, _batches(x, y), [model.state_dict()], fisher="empirical")
    train, query = ekfac_featurizers(model, task, factors, k_in=3, k_out=2)
    phi = _features(train, model, _batches(x, y)).feats[0]
    psi = _features(query, model, _batches(x[:4], y[:4])).feats[0]
    g = _layer_grads(model, classification_margin, x, y, factors)
    lo = 0
    for i, (s, f) in enumerate(zip(factors.layers, factors.factors[0])):
        p_out, p_in = (train.projector.factor(0, s, side).double() for side in ("out", "in"))
        assert all(torch.equal(train.projector.factor(0, s, side), query.projector.factor(0, s, side))
                   for side in ("out", "in"))
        c = train.projector.scales[i]
        want_train = c * p_out.T @ g[i] @ p_in  # (n, 2, 3)
        want_query = p_out.T @ f.precondition(g[i][:4]) @ p_in / (c * 3 * 2)
        np.testing.assert_allclose(phi[:, lo: lo + 6], want_train.reshape(12, 6).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(psi[:, lo: lo + 6], want_query.reshape(4, 6).numpy(), rtol=1e-5,
                                   atol=1e-6 * float(want_query.abs().max()))
        lo += 6
    assert lo == phi.shape[1] == psi.shape[1] == train.k == query.k


def test_factors_fitted_in_the_projected_space_equal_explicit_projected_matrices() -> None:
    """LoGra-style EK-FAC: with ``projection=...`` the factors are the EK-FAC of the projected
    gradients ``G~ = P_out^T G P_in``: the bases diagonalise the covariances of ``P_in^T a`` and
    ``P_out^T delta``, ``Lambda = diag(K^T F~ K)`` with ``F~ = E[vec G~ vec G~^T]``, the query
    feature is ``(K diag(Lambda + lambda) K^T)^-1 vec(G~_z) / c_L`` and the scores are
    ``vec(G~_z)^T H~^-1 vec(Q_i G~_i)`` (float64, explicit)."""
    model = _tiny()
    x, y = _data(20)
    task = ClassificationTask()
    proj = {"k_in": 3, "k_out": 2, "seed": 4, "kind": "rademacher"}
    factors = EKFACFactors.fit_batches(model, task, _batches(x, y), [model.state_dict()], fisher="empirical",
                                       projection=proj)
    assert factors.settings.projection == proj
    again = EKFACFactors.from_state_dict(factors.state_dict())
    assert again.settings.projection == proj and torch.equal(again.factors[0][0].lam, factors.factors[0][0].lam)
    train, query = ekfac_featurizers(model, task, factors, **proj)
    loss_g, f_g = _layer_grads(model, _ce, x, y, factors), _layer_grads(model, classification_margin, x, y, factors)
    inputs = [x, torch.tanh(model[0](x)).detach()]
    psi = _features(query, model, _batches(x[:5], y[:5])).feats[0]
    lo, exact = 0, []
    for i, (s, f) in enumerate(zip(factors.layers, factors.factors[0])):
        p_out, p_in = (train.projector.factor(0, s, side).double() for side in ("out", "in"))
        assert f.q_a.shape == (3, 3) and f.q_s.shape == (2, 2) and f.lam.shape == (2, 3)
        a = torch.cat([inputs[i], torch.ones(len(x), 1, dtype=x.dtype)], dim=1) @ p_in
        delta = loss_g[i][:, :, -1] @ p_out  # one position: the bias column of G_i is delta
        for q, cov in ((f.q_a, a.T @ a / len(a)), (f.q_s, delta.T @ delta / len(a))):
            rot = q.T @ cov @ q
            torch.testing.assert_close(rot - torch.diag(torch.diagonal(rot)), torch.zeros_like(rot), rtol=0,
                                       atol=_Q_RTOL * float(cov.abs().max()))
        flat = (p_out.T @ loss_g[i] @ p_in).reshape(len(x), -1)  # vec G~_i of the loss
        basis = _kron_basis(f)
        lam = torch.diagonal(basis.T @ (flat.T @ flat / len(x)) @ basis).reshape(f.lam.shape)
        torch.testing.assert_close(f.lam, lam, rtol=_Q_RTOL, atol=1e-14)
        h = basis @ torch.diag((f.lam + f.damping).reshape(-1)) @ basis.T
        gz = (p_out.T @ f_g[i][:5] @ p_in).reshape(5, -1)
        solved = torch.linalg.solve(h, gz.T).T
        np.testing.assert_allclose(psi[:, lo: lo + 6], (solved / train.projector.scales[i]).numpy(), rtol=1e-5,
                                   atol=1e-6 * float(solved.abs().max() / train.projector.scales[i]))
        exact.append(solved @ (-flat).T)
        lo += 6
    tr = ArrayFeatures(_features(train, model, _batches(x, y)), [0])
    scores = score_matrix(_features(query, model, _batches(x[:5], y[:5])), EKFACScorer().fit(tr), tr)
    np.testing.assert_allclose(scores, sum(exact).numpy(), rtol=2e-4, atol=1e-4 * np.abs(scores).max())
    assert (np.diag(scores) > 0).all()
    with pytest.raises(ShapeError, match="fitted in the space of the projection"):
        ekfac_featurizers(model, task, factors, k_in=3, k_out=3, seed=4)


def test_factored_projection_approximates_the_exact_scores() -> None:
    """Projected scores are unbiased estimates of the exact (unprojected) EK-FAC scores: over 12
    projection seeds at k_in = k_out = 16 the mean has slope in (0.85, 1.15) on the exact scores
    and Pearson > 0.85 (measured 1.07 / 0.92 Gaussian, 0.94 / 0.92 Rademacher); one projection's
    Pearson grows with k (measured 0.43 at k = 8, 0.82 at 40; asserted > 0.7 at 40). Kronecker
    projections are noisier than dense ones at equal width (tda.featurizers.factored)."""
    model = _tiny(0, (48, 64, 10), torch.float32)
    x, y = _data(64, (48,), 10, dtype=torch.float32)
    task = ClassificationTask()
    factors = EKFACFactors.fit_batches(model, task, _batches(x, y, 32), [model.state_dict()], fisher="empirical")

    def scores(k, seed=0, kind="gaussian"):
        train, query = ekfac_featurizers(model, task, factors, k, k, seed, kind)
        tr = ArrayFeatures(_features(train, model, _batches(x, y, 32)), [0])
        return score_matrix(_features(query, model, _batches(x[:8], y[:8])), EKFACScorer().fit(tr), tr).ravel()

    exact = scores(None)
    corr = {k: pearsonr(scores(k), exact).statistic for k in (8, 40)}
    assert corr[40] > 0.7 and corr[40] > corr[8], corr
    for kind in ("gaussian", "rademacher"):
        mean = np.mean([scores(16, seed, kind) for seed in range(12)], axis=0)
        slope = float(mean @ exact / (exact @ exact))
        assert 0.85 < slope < 1.15 and pearsonr(mean, exact).statistic > 0.85, (kind, slope)


# --------------------------------------------------------------- 3. kronfluence
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_rank_correlation_with_kronfluence(tmp_path, arch: str) -> None:
    """Same model, data, empirical Fisher and heuristic damping (0.1 x mean Lambda): Spearman > 0.9
    and elementwise agreement to 1e-2 (measured: Spearman 1.0, max deviation <= 4e-7 of the
    largest score, both architectures)."""
    kf = pytest.importorskip("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    class KFTask(kf.Task):
        def compute_train_loss(self, batch, model, sample=False):  # empirical Fisher: sample is never set
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return classification_margin(model(batch[0]), batch[1]).sum()

    build, shape = (_tiny, (5,)) if arch == "mlp" else (_cnn, (2, 4, 4))
    model = build(dtype=torch.float32)
    x, y = _data(20, shape, dtype=torch.float32)
    factors = EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y), [model.state_dict()],
                                       fisher="empirical")
    train, query = ekfac_featurizers(model, ClassificationTask(), factors, None, None)
    tr = ArrayFeatures(_features(train, model, _batches(x, y)), [0])
    mine = score_matrix(_features(query, model, _batches(x, y)), EKFACScorer().fit(tr), tr)

    data = torch.utils.data.TensorDataset(x, y)
    analyzer = Analyzer("ekfac", prepare_model(build(dtype=torch.float32), KFTask()), KFTask(), cpu=True,
                        disable_tqdm=True, output_dir=str(tmp_path), log_level=logging.WARNING)
    analyzer.fit_all_factors("f", data, per_device_batch_size=7, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    analyzer.compute_pairwise_scores("s", "f", data, data, per_device_query_batch_size=20,
                                     per_device_train_batch_size=20, overwrite_output_dir=True,
                                     score_args=ScoreArguments(damping_factor=None))
    theirs = -analyzer.load_pairwise_scores("s")["all_modules"].numpy()  # kronfluence: + = lowers f
    rho = spearmanr(mine.ravel(), theirs.ravel()).statistic
    assert rho > 0.9, rho
    np.testing.assert_allclose(mine, theirs, rtol=1e-2, atol=1e-3 * np.abs(theirs).max())


# --------------------------------------------------------------- 4. bad input
def test_nan_gradients_are_refused_with_the_example_ids() -> None:
    model = _tiny()
    x, y = _data(20)
    x[13, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"ids \[13\]"):
        EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y), [model.state_dict()])
    good = EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x[:10], y[:10]), [model.state_dict()])
    query = EKFACQueryFeaturizer(model, ClassificationTask(), good, None, None)
    with pytest.raises(NonFiniteError, match=r"ids \[13\]"):
        list(query.featurize(model.state_dict(), 0, _batches(x, y)()))


def test_shape_and_checkpoint_mismatches_are_refused(tmp_path) -> None:
    model = _tiny()
    x, y = _data(20)
    factors = EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y), [model.state_dict()])
    with pytest.raises(ShapeError, match="do not match the EK-FAC factors"):
        EKFACQueryFeaturizer(_tiny(0, (5, 6, 3)), ClassificationTask(), factors)
    other = _tiny(seed=3)
    query = EKFACQueryFeaturizer(other, ClassificationTask(), factors, None, None)
    with pytest.raises(CheckpointError, match="refit the factors"):
        list(query.featurize(other.state_dict(), 0, _batches(x, y)()))
    with pytest.raises(CheckpointError, match="fitted for checkpoints"):
        list(query.featurize(model.state_dict(), 4, _batches(x, y)()))
    loaded = EKFACFactors.load(factors.save(tmp_path / "f.npz"))
    assert all(torch.equal(a.lam, b.lam) for a, b in zip(loaded.factors[0], factors.factors[0]))
    state = factors.state_dict()
    state["c0_l1_lam"] = state["c0_l1_lam"][:, :-1]
    with pytest.raises(ShapeError, match="refit them"):
        EKFACFactors.from_state_dict(state)
    scorer = make_scorer("ekfac").fit(ArrayFeatures(FeatureBlock(np.arange(3), np.ones((1, 3, 4)), np.ones((1, 3))),
                                                    [0]))
    with pytest.raises(ShapeError, match="featurize queries"):
        scorer.transform_query(FeatureBlock(np.arange(2), np.ones((1, 2, 5)), np.ones((1, 2))))


class _WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(x)))


def test_unsupported_layers_are_named_with_the_fix() -> None:
    model = _WithNorm().double().eval()
    x, y = torch.randint(0, 7, (12,)), torch.randint(0, 3, (12,))
    fit = lambda **kw: EKFACFactors.fit_batches(  # noqa: E731
        model, ClassificationTask(), _batches(x, y), [model.state_dict()], **kw)
    with pytest.raises(ConfigError, match=r"layer 'norm' cannot be projected factored: it is a LayerNorm"):
        fit(layers=["norm"])
    with pytest.raises(ConfigError, match=r"\['emb.weight', 'norm.weight', 'norm.bias'\].*restrict layers"):
        fit(strict=True)
    factors = fit()
    assert [s.name for s in factors.layers] == ["head"]
    assert factors.skipped == ["emb.weight", "norm.weight", "norm.bias"]
    with pytest.raises(ConfigError, match="no \\(unshared\\) layer"):
        EKFACFactors.fit_batches(nn.Sequential(nn.Embedding(7, 3)), ClassificationTask(), _batches(x, y), [{}])


def test_bad_settings_and_tasks_without_labels() -> None:
    model = _tiny()
    x, y = _data(8)
    fit = lambda task=ClassificationTask(), **kw: EKFACFactors.fit_batches(  # noqa: E731
        model, task, _batches(x, y), [model.state_dict()], **kw)
    for kw, pattern in (({"fisher": "true"}, "fisher 'true' is unknown"), ({"samples": 0}, "samples"),
                        ({"damping": -1.0}, "damping must be a positive"), ({"damping_rel": 0.0}, "damping_rel")):
        with pytest.raises(ConfigError, match=pattern):
            fit(**kw)

    class Regression(Task):  # a Task with no labels to draw
        name = "sum"

        def output(self, model, batch):
            return model(batch["x"]).sum(dim=1)

    with pytest.raises(ConfigError, match="fisher='empirical'"):
        fit(Regression())
    assert fit(Regression(), fisher="empirical").task == "sum"
    with pytest.raises(CheckpointError, match="at least one checkpoint"):
        EKFACFactors.fit_batches(model, ClassificationTask(), _batches(x, y), [])
    with pytest.raises(TDAError, match="call fit"):
        EKFACAttributor(model, [model.state_dict()], lambda rows: rows).scores(None)
