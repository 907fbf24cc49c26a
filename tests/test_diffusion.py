"""DDPM output functions, draws and the diffusion scorers (docs/methods.md sections 1, 3, 4) against
float64 references with explicit loops over examples and timesteps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.families.unet import TinyUNet, sample_ddpm, train_ddpm
from stores.index import build_index
from tda.featurizers.diffusion import (OUTPUTS, DiffusionFeaturizer, DiffusionTask, GridDraws, NoiseSchedule, RecordedDraws,
                           SeededDraws, TrainLog, noise_from_seeds, seed_from)
from tda.errors import ConfigError, DataError, ShapeError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.gradients.per_example import flatten_grads, per_example_grads
from tda.core.kernel import score_matrix, top_k
from tda.scorers import (DiffusionReTracScorer, DiffusionTracInScorer, SlotScorer, generally_influential,
                         influence_counts, make_dtrak_scorer, make_scorer)

SCHED = NoiseSchedule(T=50, beta_start=1e-3, beta_end=0.2)
SHAPE = (1, 8, 8)  # tiny images: the UNet folds 8x8 into 4x4, then 2x2


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyUNet((4, 8), in_channels=1, time_dim=4, head=2).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (n, 1, 8, 8)


def _ref_output(model: nn.Module, x: torch.Tensor, t: int, seed: int, output: str) -> torch.Tensor:
    """f for one example, written out from the definitions in float64."""
    eps = noise_from_seeds([seed], x.shape).double()[0]
    ab = SCHED.alpha_bar[t]  # float64
    e = model((ab.sqrt() * x + (1 - ab).sqrt() * eps)[None], torch.tensor([t]))[0].reshape(-1)
    return {"loss": ((e - eps.reshape(-1)) ** 2).mean(), "square": (e ** 2).mean(), "avg": e.mean(),
            "l1": e.abs().sum(), "l2": (e ** 2).sum().sqrt()}[output]


def _ref_grad(model: nn.Module, x: torch.Tensor, t: int, seed: int, output: str) -> np.ndarray:
    """Exact gradient (d,) float64 of f for one example and one draw (one autograd call)."""
    model = copy.deepcopy(model).double()
    grads = torch.autograd.grad(_ref_output(model, x.double(), t, seed, output), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).numpy()


def _featurize(states: list[dict], x: torch.Tensor, ids: np.ndarray, draws, mode: str, output: str,
               k: int = 16) -> tuple[FeatureBlock, DiffusionFeaturizer]:
    fz = DiffusionFeaturizer(_model(0), DiffusionTask(SCHED, output), draws, mode, k=k, seed=3)
    feats, qs = [], []
    for c, state in enumerate(states):
        ((_, phi, q),) = fz.featurize(state, c, [(ids, {"x": x})])
        feats.append(phi)
        qs.append(q)
    return FeatureBlock(ids, np.stack(feats), np.stack(qs)), fz


def _projected(fz: DiffusionFeaturizer, g: np.ndarray, c: int) -> np.ndarray:
    """P_c^T g / sqrt(d) in float64."""
    return fz.projector.matrix(c).double().numpy().T @ g / np.sqrt(fz.projector.dim)


@pytest.fixture(scope="module")
def states() -> list[dict]:
    return [_model(seed).state_dict() for seed in (0, 1)]


# ------------------------------------------------------------------ draws and outputs
def test_timestep_grid_and_noise_are_deterministic() -> None:
    a, b = GridDraws(50, 5, 2, seed=7, side=1), GridDraws(50, 5, 2, seed=7, side=1)
    ids = np.array([3, 10, 11])
    ta, sa = a(0, ids)
    tb, sb = b(4, ids)  # any checkpoint, any instance: a pure function of (seed, side, id)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(sa, sb)
    assert ta.shape == sa.shape == (3, 10)
    assert np.all(ta == np.repeat(a.grid, 2)[None])  # the same grid for every example
    assert np.all((a.grid >= np.arange(5) * 10) & (a.grid < np.arange(1, 6) * 10))  # one per stratum
    np.testing.assert_array_equal(GridDraws(50, 5, 2, seed=7, side=0).grid, a.grid)  # shared by both sides
    assert not np.array_equal(GridDraws(50, 5, 2, seed=8, side=1).grid, a.grid)
    assert len(np.unique(sa)) == sa.size  # every (id, slot) its own noise
    assert not np.intersect1d(sa, GridDraws(50, 5, 2, seed=7, side=0)(0, ids)[1]).size
    assert sa[1, 3] == seed_from(7, 1, 10, 1, 1)
    np.testing.assert_array_equal(noise_from_seeds(sa[0], SHAPE), noise_from_seeds(sb[0], SHAPE))
    t1, s1 = SeededDraws(50, seed=2)(0, ids)
    np.testing.assert_array_equal(SeededDraws(50, seed=2)(3, ids)[1], s1)
    assert t1.shape == (3, 1) and np.all((t1 >= 0) & (t1 < 50))


@pytest.mark.parametrize("output", OUTPUTS)
def test_output_functions_have_finite_gradients_with_the_documented_sign(output: str) -> None:
    model, x = _model(0), _images(4, seed=1)
    t, seeds = np.array([0, 10, 30, 49]), np.array([11, 12, 13, 14])
    batch = {"x": x, "t": torch.from_numpy(t), "noise": noise_from_seeds(seeds, SHAPE)}
    task = DiffusionTask(SCHED, output)
    f = task.output(model, batch).detach()
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = [float(_ref_output(m64, x[i].double(), int(t[i]), int(seeds[i]), output)) for i in range(4)]
    np.testing.assert_allclose(f.numpy(), ref, rtol=1e-4, atol=1e-6)
    if output != "avg":
        assert torch.all(f >= 0)
    assert task.q_value == (-1.0 if output == "loss" else 1.0)  # Q = -dLoss/df
    names = [n for n, _ in model.named_parameters()]
    grads = flatten_grads(per_example_grads(model, task, batch), names)  # (4, d) via vmap
    assert grads.shape == (4, sum(p.numel() for p in model.parameters())) and torch.isfinite(grads).all()
    for i in range(4):
        g_ref = _ref_grad(model, x[i], int(t[i]), int(seeds[i]), output)
        np.testing.assert_allclose(grads[i].numpy(), g_ref, rtol=1e-3, atol=1e-5 * np.abs(g_ref).max())
        # a small step along the gradient raises f: features are gradients of f itself
        direction = torch.split(grads[i] / grads[i].norm(), [p.numel() for p in model.parameters()])
        moved = {n: p.detach() + 1e-2 * d.reshape(p.shape) for (n, p), d in zip(model.named_parameters(), direction)}
        one = {k: v[i: i + 1] for k, v in batch.items()}
        f_new = task.output(lambda *a: torch.func.functional_call(model, moved, a), one)
        assert float(f_new) > float(f[i])
    with pytest.raises(ConfigError, match="use one of"):
        DiffusionTask(SCHED, "mse")


# ------------------------------------------------------------------ scorers vs float64 loops
@pytest.mark.parametrize("output", ["loss", "square"])
def test_dtrak_equals_float64_reference(states, output: str) -> None:
    """D-TRAK: TRAK on gradients averaged over the timestep grid (before projection), Q = -1 for loss."""
    n, m, lam = 6, 3, 0.05
    xt, xq = _images(n, seed=2), _images(m, seed=3)
    ids_t, ids_q = np.arange(n) + 100, np.arange(m)
    grid_t, grid_q = GridDraws(SCHED.T, 3, 1, seed=5, side=0), GridDraws(SCHED.T, 3, 1, seed=5, side=1)
    train, fz = _featurize(states, xt, ids_t, grid_t, "mean", output)
    query, _ = _featurize(states, xq, ids_q, grid_q, "mean", output)
    np.testing.assert_array_equal(train.q, np.full((2, n), -1.0 if output == "loss" else 1.0))
    source = ArrayFeatures(train, [0, 1])
    got = score_matrix(query, make_dtrak_scorer(lam).fit(source), source)

    def phi(x: torch.Tensor, ids: np.ndarray, draws: GridDraws, c: int) -> np.ndarray:  # (b, k) float64
        model = _model(0)
        model.load_state_dict(states[c])
        t, seeds = draws(c, ids)
        rows = []
        for i in range(len(ids)):  # explicit loops over examples and timesteps
            g = np.mean([_ref_grad(model, x[i], int(t[i, j]), int(seeds[i, j]), output) for j in range(3)], axis=0)
            rows.append(_projected(fz, g, c))
        return np.stack(rows)

    ref = 0.0
    for c in range(2):
        pt, pq = phi(xt, ids_t, grid_t, c), phi(xq, ids_q, grid_q, c)
        np.testing.assert_allclose(train.feats[c], pt, rtol=1e-3, atol=1e-4 * np.abs(pt).max())
        gram = pt.T @ pt
        kern = gram + lam * np.mean(np.diag(gram)) * np.eye(gram.shape[0])
        ref = ref + pq @ np.linalg.inv(kern) @ pt.T / 2  # (m, n)
    ref = ref * (-1.0 if output == "loss" else 1.0)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    # sign: training on an example lowers its own loss (self-scores < 0), raises its own square
    self_scores = np.diag(score_matrix(train, make_dtrak_scorer(lam).fit(source), source))
    assert np.all(self_scores < 0) if output == "loss" else np.all(self_scores > 0)


def test_pooled_train_draws_equal_float64_reference(states) -> None:
    """train_draws: grid: one slot [P^T g / sqrt(d), ||g||] of the loss gradient averaged over the
    grid draws (pooled before normalising); TracIn/ReTrac score it like a recorded draw."""
    n, m, etas = 4, 2, [0.3, 0.1]
    xt, xq = _images(n, seed=10), _images(m, seed=11)
    ids_t, ids_q = np.arange(n) + 3, np.arange(m)
    grid_t, grid_q = GridDraws(SCHED.T, 3, 1, seed=2, side=0), GridDraws(SCHED.T, 2, 1, seed=2, side=1)
    train, fz = _featurize(states, xt, ids_t, grid_t, "pooled", "loss")
    query, _ = _featurize(states, xq, ids_q, grid_q, "slots", "loss")
    k = fz.projector.k
    assert train.feats.shape == (2, n, k + 1) and fz.feature_dim == k + 1
    source = ArrayFeatures(train, [0, 1])
    got = score_matrix(query, DiffusionReTracScorer(etas, k).fit(source), source)
    ref = np.zeros((m, n))
    for c in range(2):
        model = _model(0)
        model.load_state_dict(states[c])
        t, seeds = grid_t(c, ids_t)
        g = [np.mean([_ref_grad(model, xt[i], int(t[i, j]), int(seeds[i, j]), "loss") for j in range(3)], axis=0)
             for i in range(n)]  # (n, d) pooled gradients
        np.testing.assert_allclose(train.feats[c, :, k], np.linalg.norm(g, axis=1), rtol=1e-4)
        np.testing.assert_allclose(train.feats[c, :, :k], [_projected(fz, gi, c) for gi in g], rtol=1e-3,
                                   atol=1e-4 * np.abs(train.feats[c, :, :k]).max())
        tq, sq = grid_q(c, ids_q)
        for q in range(m):
            gq = [_ref_grad(model, xq[q], int(tq[q, j]), int(sq[q, j]), "loss") for j in range(2)]
            unit = np.mean([_projected(fz, v / np.linalg.norm(v), c) for v in gq], axis=0)
            for i in range(n):
                ref[q, i] -= etas[c] * unit @ _projected(fz, g[i] / np.linalg.norm(g[i]), c)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def _synthetic_log(ids: np.ndarray, epochs: int, seed: int) -> TrainLog:
    rng = np.random.default_rng(seed)
    n = len(ids)
    return TrainLog(step=np.repeat(np.arange(epochs), n), epoch=np.repeat(np.arange(epochs), n),
                    example_id=np.tile(rng.permutation(ids), epochs), timestep=rng.integers(0, SCHED.T, epochs * n),
                    noise_seed=rng.integers(0, 1 << 40, epochs * n))


def test_diffusion_tracin_and_retrac_equal_float64_reference(states) -> None:
    """Train side: loss gradient at the recorded draw of checkpoint c's epoch; query side: the
    output gradient per grid draw (3 timesteps x 2 noises); ReTrac normalises both by the full norm."""
    n, m, etas = 5, 3, [0.3, 0.1]
    xt, xq = _images(n, seed=4), _images(m, seed=5)
    ids_t, ids_q = np.arange(n) + 7, np.arange(m)
    log = _synthetic_log(ids_t, epochs=2, seed=0)
    recorded = RecordedDraws({0: log, 1: log}, {0: 0, 1: 1})
    grid = GridDraws(SCHED.T, 3, 2, seed=1, side=1)
    train, fz = _featurize(states, xt, ids_t, recorded, "slots", "loss")
    query, _ = _featurize(states, xq, ids_q, grid, "slots", "square")
    k = fz.projector.k
    assert train.feats.shape == (2, n, k + 1) and query.feats.shape == (2, m, 6 * (k + 1))
    source = ArrayFeatures(train, [0, 1])
    got = {cls.name: score_matrix(query, cls(etas, k).fit(source), source)
           for cls in (DiffusionTracInScorer, DiffusionReTracScorer)}
    ref = {"diffusion-tracin": np.zeros((m, n)), "diffusion-retrac": np.zeros((m, n))}
    for c in range(2):
        model = _model(0)
        model.load_state_dict(states[c])
        t_tr, s_tr = recorded(c, ids_t)
        rows = log.epoch == c
        for i, ident in enumerate(ids_t):  # the draw the example was trained with in epoch c
            hit = rows & (log.example_id == ident)
            assert (t_tr[i, 0], s_tr[i, 0]) == (log.timestep[hit][0], log.noise_seed[hit][0])
        g_tr = [_ref_grad(model, xt[i], int(t_tr[i, 0]), int(s_tr[i, 0]), "loss") for i in range(n)]
        np.testing.assert_allclose(train.feats[c, :, k], np.linalg.norm(g_tr, axis=1), rtol=1e-4)
        t_q, s_q = grid(c, ids_q)
        for q in range(m):
            g_q = [_ref_grad(model, xq[q], int(t_q[q, j]), int(s_q[q, j]), "square") for j in range(6)]
            raw = np.mean([_projected(fz, g, c) for g in g_q], axis=0)
            unit = np.mean([_projected(fz, g / np.linalg.norm(g), c) for g in g_q], axis=0)
            for i in range(n):
                ref["diffusion-tracin"][q, i] -= etas[c] * raw @ _projected(fz, g_tr[i], c)
                ref["diffusion-retrac"][q, i] -= etas[c] * unit @ _projected(
                    fz, g_tr[i] / np.linalg.norm(g_tr[i]), c)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-3, atol=2e-3 * np.abs(ref[name]).max(), err_msg=name)


def test_generic_gradient_scorers_on_slots_equal_float64_reference(states) -> None:
    """TracInCP, Grad-Dot and Grad-Cos on slot features (SlotScorer): train side minus the loss
    gradient at the recorded draw, query side the mean of the grid draws' output gradients."""
    n, m, etas = 4, 2, [0.3, 0.1]
    xt, xq = _images(n, seed=6), _images(m, seed=7)
    ids_t, ids_q = np.arange(n) + 20, np.arange(m)
    log = _synthetic_log(ids_t, epochs=2, seed=1)
    recorded, grid = RecordedDraws({0: log, 1: log}, {0: 0, 1: 1}), GridDraws(SCHED.T, 2, 1, seed=2, side=1)
    train, fz = _featurize(states, xt, ids_t, recorded, "slots", "loss")
    query, _ = _featurize(states, xq, ids_q, grid, "slots", "loss")
    k, source = fz.projector.k, ArrayFeatures(train, [0, 1])
    kwargs = {"tracin": {"learning_rates": etas}, "graddot": {}, "gradcos": {}}
    got = {name: score_matrix(query, SlotScorer(make_scorer(name, **kw), k).fit(source), source)
           for name, kw in kwargs.items()}
    ref = {name: np.zeros((m, n)) for name in kwargs}
    for c in range(2):
        model = _model(0)
        model.load_state_dict(states[c])
        (t_tr, s_tr), (t_q, s_q) = recorded(c, ids_t), grid(c, ids_q)
        p_tr = [_projected(fz, _ref_grad(model, xt[i], int(t_tr[i, 0]), int(s_tr[i, 0]), "loss"), c) for i in range(n)]
        p_q = [np.mean([_projected(fz, _ref_grad(model, xq[q], int(t_q[q, j]), int(s_q[q, j]), "loss"), c)
                        for j in range(2)], axis=0) for q in range(m)]
        for q in range(m):
            for i in range(n):
                dot = p_q[q] @ p_tr[i]
                ref["tracin"][q, i] -= etas[c] * dot
                ref["graddot"][q, i] -= dot / 2
                ref["gradcos"][q, i] -= dot / (np.linalg.norm(p_q[q]) * np.linalg.norm(p_tr[i])) / 2
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-3, atol=2e-3 * np.abs(ref[name]).max(), err_msg=name)
    same = score_matrix(query, DiffusionTracInScorer(etas, k).fit(source), source)
    np.testing.assert_allclose(got["tracin"], same, rtol=1e-5, atol=1e-6 * np.abs(same).max())


def test_tracin_score_predicts_the_effect_of_a_training_step() -> None:
    """Sign convention: one SGD step on the training loss of z_i changes the query output
    f(z) (mean over its grid draws) by about the Diffusion-TracIn score (exact gradients)."""
    model = copy.deepcopy(_model(3)).double()
    x_tr, x_q = _images(3, seed=8).double(), _images(1, seed=9).double()
    t_tr, s_tr = np.array([5, 20, 40]), np.array([101, 102, 103])
    t_q, s_q = GridDraws(SCHED.T, 4, 1, seed=0, side=1)(0, np.array([0]))
    params = dict(model.named_parameters())

    def f_query(p: dict) -> torch.Tensor:
        call = lambda *a: torch.func.functional_call(model, p, a)  # noqa: E731
        return torch.stack([_ref_output(call, x_q[0], int(t), int(sd), "loss") for t, sd in zip(t_q[0], s_q[0])]).mean()

    g_q = [_ref_grad(model, x_q[0], int(t), int(sd), "loss") for t, sd in zip(t_q[0], s_q[0])]
    d, eta = len(g_q[0]), 1e-3
    query = FeatureBlock([0], np.concatenate([np.r_[g, np.linalg.norm(g)] for g in g_q])[None, None], np.ones((1, 1)))
    base = float(f_query({n: p.detach() for n, p in params.items()}))
    for i in range(3):
        g = _ref_grad(model, x_tr[i], int(t_tr[i]), int(s_tr[i]), "loss")
        train = FeatureBlock([i], np.r_[g, np.linalg.norm(g)][None, None], np.ones((1, 1)))
        score = float(score_matrix(query, DiffusionTracInScorer([eta], d), ArrayFeatures(train, [0]))[0, 0])
        step = dict(zip(params, torch.split(torch.from_numpy(g), [p.numel() for p in params.values()])))
        moved = {n: p.detach() - eta * step[n].reshape(p.shape) for n, p in params.items()}
        change = float(f_query(moved)) - base
        assert np.sign(score) == np.sign(change) and abs(score - change) < 0.1 * abs(change), (score, change)


def test_retrac_normalisation_removes_gradient_scale(rng) -> None:
    """Scaling a training gradient, or one query draw, changes TracIn but not ReTrac."""
    k, etas = 6, [0.5, 0.2]
    train = _slot_block(rng, 2, 12, k, 1)
    query = _slot_block(rng, 2, 4, k, 3)
    scaled_train = FeatureBlock(train.ids, train.feats.copy(), train.q)
    scaled_train.feats[:, 5] *= 9.0  # example 5: a 9x larger gradient (phi and its norm)
    scaled_query = FeatureBlock(query.ids, query.feats.copy(), query.q)
    scaled_query.feats[:, :, : k + 1] *= 4.0  # draw 0 of every query
    for cls, changes in ((DiffusionReTracScorer, False), (DiffusionTracInScorer, True)):
        base = score_matrix(query, cls(etas, k), ArrayFeatures(train, [0, 1]))
        for tr, qu in ((scaled_train, query), (train, scaled_query)):
            other = score_matrix(qu, cls(etas, k), ArrayFeatures(tr, [0, 1]))
            assert (not np.allclose(other, base, rtol=1e-4)) == changes, cls.name
    tr_vec = DiffusionReTracScorer(etas, k).transform_train(train)  # (b, M*k)
    unit = train.feats[:, :, :k] / train.feats[:, :, k:]  # phi / ||g||
    np.testing.assert_allclose(tr_vec, -np.concatenate([np.sqrt(e) * unit[c] for c, e in enumerate(etas)], 1),
                               rtol=1e-5)


def _slot_block(rng: np.random.Generator, m_count: int, n: int, k: int, slots: int, first: int = 0) -> FeatureBlock:
    phi = rng.standard_normal((m_count, n, slots, k)) * rng.uniform(0.2, 5.0, (m_count, n, slots, 1))
    norms = np.linalg.norm(phi, axis=-1, keepdims=True) * rng.uniform(1.5, 3.0, (m_count, n, slots, 1))
    feats = np.concatenate([phi, norms], axis=-1).reshape(m_count, n, slots * (k + 1)).astype(np.float32)
    return FeatureBlock(np.arange(n) + first, feats, np.ones((m_count, n), np.float32))


@pytest.mark.parametrize("name", ["dtrak", "diffusion-tracin", "diffusion-retrac"])
def test_faiss_top_k_equals_dense_top_k(rng, name: str) -> None:
    k = 5
    if name == "dtrak":
        train = FeatureBlock(np.arange(40) + 1000, rng.standard_normal((2, 40, k)).astype(np.float32),
                             -np.ones((2, 40), np.float32))
        query = FeatureBlock(np.arange(4), rng.standard_normal((2, 4, k)).astype(np.float32), -np.ones((2, 4)))
        scorer = make_dtrak_scorer(0.1)
    else:
        train, query = _slot_block(rng, 2, 40, k, 1, first=1000), _slot_block(rng, 2, 4, k, 3)
        scorer = (DiffusionReTracScorer if name == "diffusion-retrac" else DiffusionTracInScorer)([0.4, 0.1], k)
    source = ArrayFeatures(train, [0, 1])
    scorer.fit(source)
    assert scorer.name == name
    dense = score_matrix(query, scorer, source)  # (4, 40)
    got = build_index(source, scorer, block_rows=9).top_k(scorer.transform_query(query), 6)
    exact = top_k(query, scorer, source, k=6, block_rows=7)
    tol = 1e-5 * np.abs(dense).max()
    srt = np.sort(dense, axis=1)
    np.testing.assert_allclose(got.proponent_scores, srt[:, ::-1][:, :6], atol=tol)
    np.testing.assert_allclose(got.opponent_scores, srt[:, :6], atol=tol)
    np.testing.assert_allclose(exact.proponent_scores, got.proponent_scores, atol=tol)
    np.testing.assert_allclose(exact.opponent_scores, got.opponent_scores, atol=tol)
    col = {int(i): j for j, i in enumerate(train.ids)}
    for ids, scores in ((got.proponent_ids, got.proponent_scores), (got.opponent_ids, got.opponent_scores)):
        np.testing.assert_allclose(np.take_along_axis(dense, np.vectorize(col.__getitem__)(ids), 1), scores, atol=tol)


def test_generally_influential_counts_and_retrac_reduces_them(rng) -> None:
    top = np.array([[1, 2, 1], [1, 3, 5], [2, 1, 6], [4, 5, 7]])
    np.testing.assert_array_equal(generally_influential(top, 0.5), [1])  # 3 of 4 lists (repeats count once)
    np.testing.assert_array_equal(generally_influential(top, 0.25), [1, 2, 5])
    assert len(generally_influential(top, 0.75)) == 0
    with pytest.raises(ConfigError, match="fraction"):
        generally_influential(top, 1.0)
    with pytest.raises(ShapeError):
        generally_influential(top[0], 0.5)
    # a few training examples with huge gradient norms dominate TracIn's top-k for every query
    k = 8
    train = _slot_block(rng, 1, 50, k, 1)
    train.feats[0, :3] *= 50.0
    query = _slot_block(rng, 1, 20, k, 2)
    counts = influence_counts(query, ArrayFeatures(train, [0]), {
        "tracin": DiffusionTracInScorer([1.0], k), "retrac": DiffusionReTracScorer([1.0], k)}, k=3, fraction=0.3)
    found = set(counts["tracin"]["proponents"]) | set(counts["tracin"]["opponents"])
    assert {0, 1, 2} <= found
    retrac = len(counts["retrac"]["proponents"]) + len(counts["retrac"]["opponents"])
    assert retrac < len(counts["tracin"]["proponents"]) + len(counts["tracin"]["opponents"])


def test_slot_scorers_reject_misuse(rng) -> None:
    k = 4
    two_slot_train = _slot_block(rng, 1, 5, k, 2)
    with pytest.raises(ShapeError, match="one slot"):
        DiffusionTracInScorer([1.0], k).transform_train(two_slot_train)
    with pytest.raises(ShapeError, match="k\\+1"):
        DiffusionTracInScorer([1.0], k).fit(ArrayFeatures(two_slot_train, [0]))
    with pytest.raises(ShapeError, match="S\\*\\(k\\+1\\)"):
        DiffusionReTracScorer([1.0], k + 1).transform_query(two_slot_train)
    with pytest.raises(ConfigError, match="one learning rate per checkpoint"):
        DiffusionReTracScorer([1.0, 2.0], k).transform_query(two_slot_train)
    zero = _slot_block(rng, 1, 3, k, 1)
    zero.feats[:] = 0.0  # zero gradients score 0, not NaN
    assert np.all(DiffusionReTracScorer([1.0], k).transform_train(zero) == 0)


# ------------------------------------------------------------------ training, replay, sampling
def test_zero_data_weights_drop_examples_without_reshuffling() -> None:
    """Small-drop for DDPM: a zero weight removes an example's loss while every batch, timestep
    and noise draw stays the full run's (so the images it holds do not matter); weights of one
    are the unweighted run."""
    x, ids = _images(8, seed=3), np.arange(8)
    run = dict(epochs=2, lr=1e-3, batch_size=3, seed=5)
    plain, log = train_ddpm(lambda: _model(0), x, ids, SCHED, **run)
    ones, _ = train_ddpm(lambda: _model(0), x, ids, SCHED, weights=torch.ones(8), **run)
    for a, b in zip(plain.state_dict().values(), ones.state_dict().values()):
        torch.testing.assert_close(a, b)
    w = torch.ones(8)
    w[[2, 5]] = 0.0
    garbage = x.clone()
    garbage[[2, 5]] = 50.0
    dropped, log_d = train_ddpm(lambda: _model(0), x, ids, SCHED, weights=w, **run)
    same, _ = train_ddpm(lambda: _model(0), garbage, ids, SCHED, weights=w, **run)
    for a, b, c in zip(dropped.state_dict().values(), same.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, c) for a, c in zip(dropped.state_dict().values(), plain.state_dict().values()))
    for key, value in log.arrays().items():
        np.testing.assert_array_equal(value, log_d.arrays()[key])
    with pytest.raises(DataError, match=r"weights must be \(8,\)"):
        train_ddpm(lambda: _model(0), x, ids, SCHED, weights=torch.ones(7), **run)


def test_sgd_steps_are_minus_lr_times_the_clipped_batch_gradient() -> None:
    """``optimizer="sgd"``: one full-batch step moves the weights by -lr x the (norm-clipped)
    gradient of L_simple at the recorded draws, the step TracIn-style scorers assume."""
    x, ids = _images(6, seed=2), np.arange(6)
    start = _model(0)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    model, log = train_ddpm(lambda: start, x, ids, SCHED, epochs=1, lr=0.05, batch_size=6, seed=1,
                            warmup_steps=1, optimizer="sgd")
    fresh = _model(0)
    fresh.load_state_dict(init)
    order = [int(np.nonzero(ids == i)[0][0]) for i in log.example_id]
    ab = SCHED.alpha_bar.float()[torch.from_numpy(log.timestep)].reshape(-1, 1, 1, 1)
    noise = noise_from_seeds(log.noise_seed, SHAPE)
    xt = ab.sqrt() * x[order] + (1 - ab).sqrt() * noise
    loss = torch.nn.functional.mse_loss(fresh(xt, torch.from_numpy(log.timestep)), noise)
    grads = torch.autograd.grad(loss, list(fresh.parameters()))
    scale = min(1.0, 1.0 / float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
    for (name, p), g in zip(fresh.named_parameters(), grads):
        torch.testing.assert_close(model.state_dict()[name], p.detach() - 0.05 * scale * g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="optimizer 'rmsprop' is unknown"):
        train_ddpm(lambda: _model(0), x, ids, SCHED, epochs=1, optimizer="rmsprop")


def test_training_records_the_draws_it_used_and_is_deterministic() -> None:
    x, ids = _images(8, seed=6), np.arange(8) * 3 + 1
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recording(nn.Module):  # records the inputs of every training forward pass
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(0)

        def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if self.training:
                seen.append((xt.detach().clone(), t.clone()))
            return self.net(xt, t)

    lrs: list[float] = []
    model, log = train_ddpm(Recording, x, ids, SCHED, epochs=2, lr=1e-3, batch_size=3, seed=4,
                            on_epoch=lambda e, m, lr: lrs.append(lr))
    assert len(log.step) == 16 and log.step.max() == len(seen) - 1 == 5 and len(lrs) == 2
    for e in range(2):  # every example once per epoch
        np.testing.assert_array_equal(np.sort(log.example_id[log.epoch == e]), ids)
    row = {int(i): r for r, i in enumerate(ids)}
    alpha_bar = SCHED.alpha_bar.float()
    for s, (xt, t) in enumerate(seen):  # replaying the log regenerates exactly what training saw
        sel = log.step == s
        np.testing.assert_array_equal(t.numpy(), log.timestep[sel])
        clean = x[[row[int(i)] for i in log.example_id[sel]]]
        ab = alpha_bar[torch.from_numpy(log.timestep[sel])].reshape(-1, 1, 1, 1)
        replay = ab.sqrt() * clean + (1 - ab).sqrt() * noise_from_seeds(log.noise_seed[sel], SHAPE)
        torch.testing.assert_close(xt, replay)
    again, log2 = train_ddpm(Recording, x, ids, SCHED, epochs=2, lr=1e-3, batch_size=3, seed=4)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in log.arrays().items():
        np.testing.assert_array_equal(value, log2.arrays()[key])
    restored = TrainLog.from_arrays(log.arrays())
    t1, s1 = RecordedDraws({0: restored}, {0: 1})(0, ids[::-1])
    last = log.epoch == 1
    expect = {int(i): (tt, ss) for i, tt, ss in zip(log.example_id[last], log.timestep[last], log.noise_seed[last])}
    assert [(a, b) for a, b in zip(t1[:, 0], s1[:, 0])] == [expect[int(i)] for i in ids[::-1]]
    with pytest.raises(DataError, match="not trained"):
        RecordedDraws({0: restored}, {0: 1})(0, np.array([999]))
    with pytest.raises(DataError, match="missing"):
        TrainLog.from_arrays({"step": log.step})


def test_sampler_is_seeded_and_bounded() -> None:
    model, sched = _model(2), NoiseSchedule(T=5, beta_start=1e-3, beta_end=0.2)
    a, b = sample_ddpm(model, sched, 3, SHAPE, seed=1), sample_ddpm(model, sched, 3, SHAPE, seed=1)
    assert a.shape == (3, *SHAPE) and torch.equal(a, b) and a.abs().max() <= 1
    assert not torch.equal(a, sample_ddpm(model, sched, 3, SHAPE, seed=2))
    with pytest.raises(ConfigError, match="beta"):
        NoiseSchedule(T=10, beta_start=0.3, beta_end=0.1)
