"""MAGIC (docs/methods.md section 8): exact metagradients through deterministic training.

References, all float64 on a Linear(4, 8)-tanh-Linear(8, 3) model and 24 random examples:
``torch.optim`` runs (the recipes' forward semantics), central finite differences of
``recipe.train``, and autograd through an independently written, fully unrolled training loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tda.errors import ConfigError, DataError, NonFiniteError, ShapeError, TDAError
from tda.scorers.magic import AdamRecipe, SGDRecipe, magic_scores
from tda.models.tasks import ClassificationTask

N, M = 24, 4

RECIPES = {
    "sgd-momentum-wd-cosine": SGDRecipe(epochs=3, lr=0.2, momentum=0.9, weight_decay=1e-2, batch_size=8,
                                        schedule="cosine", warmup=2, seed=1),
    "sgd-nesterov-linear-partial": SGDRecipe(epochs=2, lr=0.3, momentum=0.5, nesterov=True, batch_size=10,
                                             schedule="linear", seed=2),
    "sgd-plain": SGDRecipe(epochs=2, lr=0.5, batch_size=6, seed=3),
    "adam-wd": AdamRecipe(epochs=3, lr=0.05, weight_decay=1e-2, batch_size=8, schedule="cosine", seed=4),
    "adamw": AdamRecipe(epochs=2, lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1,
                        decoupled_weight_decay=True, batch_size=8, warmup=1, seed=5),
}


def model_fn() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


TRAIN, QUERY = make_rows(N), make_rows(M, seed=1)


def outputs(state: dict, rows: list[dict]) -> torch.Tensor:
    model = model_fn()
    model.load_state_dict(state)
    with torch.no_grad():
        return ClassificationTask().output(model, collate(rows))


# ---- forward semantics ----------------------------------------------------------------------------
def _torch_optimizer(recipe, params):
    if isinstance(recipe, SGDRecipe):
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               nesterov=recipe.nesterov)
    return torch.optim.Adam(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                            weight_decay=recipe.weight_decay, decoupled_weight_decay=recipe.decoupled_weight_decay)


@pytest.mark.parametrize("name", list(RECIPES))
def test_train_matches_torch_optim(name: str) -> None:
    recipe = RECIPES[name]
    torch.manual_seed(recipe.seed)
    model = model_fn()
    opt = _torch_optimizer(recipe, model.parameters())
    plan = recipe.plan(N)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: recipe.lr_at(t, len(plan)) / recipe.lr)
    data = collate(TRAIN)
    for idx in plan:
        opt.zero_grad()
        F.cross_entropy(model(data["x"][idx]), data["y"][idx]).backward()
        opt.step()
        sched.step()
    got = recipe.train(model_fn, TRAIN, collate)
    for key, ref in model.state_dict().items():
        torch.testing.assert_close(got[key], ref, rtol=1e-10, atol=1e-12)


def test_plan_schedule_and_determinism() -> None:
    recipe = SGDRecipe(epochs=2, lr=1.0, batch_size=7, schedule="cosine", warmup=2, seed=9)
    plan = recipe.plan(N)
    assert [len(b) for b in plan] == [7, 7, 7, 3] * 2
    for epoch in (plan[:4], plan[4:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(N))
    assert not torch.equal(plan[0], plan[4])
    assert [len(b) for b in SGDRecipe(epochs=2, batch_size=7, drop_last=True).plan(N)] == [7] * 6
    assert all(torch.equal(a, b) for a, b in zip(plan, recipe.plan(N)))
    lrs = [recipe.lr_at(t, 8) for t in range(8)]
    np.testing.assert_allclose(lrs[:2], [0.5, 1.0])
    np.testing.assert_allclose(lrs[2:], [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    np.testing.assert_allclose(SGDRecipe(lr=2.0, schedule="linear").lr_at(3, 4), 0.5)
    # training is a function of the seed alone and leaves the global generator untouched
    before = torch.random.get_rng_state()
    a, b = recipe.train(model_fn, TRAIN, collate), recipe.train(model_fn, TRAIN, collate)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = SGDRecipe(epochs=2, lr=1.0, batch_size=7, seed=10).train(model_fn, TRAIN, collate)
    assert not torch.equal(a["0.weight"], other["0.weight"])


# ---- metagradients against references ------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_matches_central_finite_differences(name: str) -> None:
    recipe = RECIPES[name]
    scores = magic_scores(model_fn, TRAIN, QUERY, collate, recipe)
    assert scores.shape == (M, N) and scores.dtype == np.float64
    eps = 1e-5
    for i in (0, 11, 23):
        delta = torch.zeros(N, dtype=torch.float64)
        delta[i] = eps
        up = outputs(recipe.train(model_fn, TRAIN, collate, weights=1 + delta), QUERY)
        down = outputs(recipe.train(model_fn, TRAIN, collate, weights=1 - delta), QUERY)
        np.testing.assert_allclose(scores[:, i], ((up - down) / (2 * eps)).numpy(), rtol=1e-5, atol=1e-8)


def _unrolled_outputs(recipe, w: torch.Tensor) -> torch.Tensor:
    """Query margins after training, differentiable in ``w``: the update rules written out again."""
    torch.manual_seed(recipe.seed)
    model = model_fn()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    data, plan = collate(TRAIN), recipe.plan(N)
    for t, idx in enumerate(plan):
        lr = recipe.lr_at(t, len(plan))
        logits = functional_call(model, dict(zip(names, params)), (data["x"][idx],))
        loss = (w[idx] * F.cross_entropy(logits, data["y"][idx], reduction="none")).sum() / len(idx)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for k, (p, g) in enumerate(zip(params, grads)):
            if isinstance(recipe, SGDRecipe):
                g = g + recipe.weight_decay * p
                m1[k] = recipe.momentum * m1[k] + g
                d = g + recipe.momentum * m1[k] if recipe.nesterov else m1[k]
                params[k] = p - lr * d
            else:
                (b1, b2), decay = recipe.betas, recipe.weight_decay
                if recipe.decoupled_weight_decay:
                    p = p - lr * decay * p
                else:
                    g = g + decay * p
                m1[k] = b1 * m1[k] + (1 - b1) * g
                m2[k] = b2 * m2[k] + (1 - b2) * g ** 2
                hat1, hat2 = m1[k] / (1 - b1 ** (t + 1)), m2[k] / (1 - b2 ** (t + 1))
                params[k] = p - lr * hat1 / (hat2.sqrt() + recipe.eps)
    return ClassificationTask().output(lambda x: functional_call(model, dict(zip(names, params)), (x,)),
                                       collate(QUERY))


@pytest.mark.parametrize("name", ["sgd-momentum-wd-cosine", "sgd-nesterov-linear-partial", "adam-wd", "adamw"])
def test_matches_autograd_through_unrolled_training(name: str) -> None:
    recipe = RECIPES[name]
    w = torch.ones(N, dtype=torch.float64, requires_grad=True)
    f = _unrolled_outputs(recipe, w)
    torch.testing.assert_close(f.detach(), outputs(recipe.train(model_fn, TRAIN, collate), QUERY),
                               rtol=1e-10, atol=1e-12)
    ref = torch.stack([torch.autograd.grad(f[j], w, retain_graph=True)[0] for j in range(M)])
    scores = magic_scores(model_fn, TRAIN, QUERY, collate, recipe)
    np.testing.assert_allclose(scores, ref.numpy(), rtol=1e-9, atol=1e-12)
    # at other weights, too
    w2 = (0.5 + torch.rand(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).requires_grad_(True)
    f2 = _unrolled_outputs(recipe, w2)
    ref2 = torch.stack([torch.autograd.grad(f2[j], w2, retain_graph=True)[0] for j in range(M)])
    np.testing.assert_allclose(magic_scores(model_fn, TRAIN, QUERY, collate, recipe, weights=w2.detach()),
                               ref2.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd-momentum-wd-cosine", "adamw"])
def test_segment_length_and_query_batching_do_not_change_scores(name: str) -> None:
    recipe = RECIPES[name]
    total = len(recipe.plan(N))
    ref = magic_scores(model_fn, TRAIN, QUERY, collate, recipe, segment=1, query_batch=M)
    for segment, query_batch in ((None, M), (total, M), (5, 1), (None, 3), (total + 7, 100)):
        got = magic_scores(model_fn, TRAIN, QUERY, collate, recipe, segment=segment, query_batch=query_batch)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_dataset_input_and_float32() -> None:
    from tda.data.loading import as_dataset

    recipe = RECIPES["sgd-momentum-wd-cosine"]
    cols = {"x": np.stack([r["x"].numpy() for r in TRAIN]), "y": np.array([int(r["y"]) for r in TRAIN])}
    ds = as_dataset(cols)

    def columns_collate(c):
        return {"x": torch.tensor(np.asarray(c["x"], dtype=np.float64)), "y": torch.tensor(c["y"])}

    ref = magic_scores(model_fn, TRAIN, QUERY, collate, recipe)
    got = magic_scores(model_fn, ds, QUERY, columns_collate, recipe, query_collate=collate)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    # a float32 model: data are cast to it, scores come back float32 and agree roughly
    f32 = magic_scores(lambda: model_fn().float(), TRAIN, QUERY, collate, recipe)
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, ref, rtol=1e-3, atol=1e-4)


def test_upweighting_a_duplicate_of_the_query_raises_its_margin() -> None:
    recipe = SGDRecipe(epochs=4, lr=0.2, momentum=0.9, weight_decay=1e-3, batch_size=8, seed=0)
    train = TRAIN + QUERY  # rows N .. N+M-1 are copies of the queries
    scores = magic_scores(model_fn, train, QUERY, collate, recipe)
    dup = scores[np.arange(M), N + np.arange(M)]
    assert (dup > 0).all()
    assert (dup > np.median(scores, axis=1)).all()
    # and a finite step along that weight does raise it
    w = torch.ones(N + M, dtype=torch.float64)
    w[N] = 1.5
    assert outputs(recipe.train(model_fn, train, collate, weights=w), QUERY[:1]) > \
        outputs(recipe.train(model_fn, train, collate), QUERY[:1])


# ---- misuse ---------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_a_clear_error() -> None:
    recipe = SGDRecipe(epochs=1, lr=0.1, batch_size=8)
    with pytest.raises(DataError, match="empty"):
        recipe.train(model_fn, [], collate)
    with pytest.raises(DataError, match="empty"):
        magic_scores(model_fn, TRAIN, [], collate, recipe)
    with pytest.raises(ShapeError, match=r"shape \(24,\)"):
        recipe.train(model_fn, TRAIN, collate, weights=torch.ones(N - 1))
    with pytest.raises(ShapeError, match=r"shape \(24,\)"):
        magic_scores(model_fn, TRAIN, QUERY, collate, recipe, weights=np.ones((N, 1)))
    with pytest.raises(NonFiniteError, match="weights"):
        recipe.train(model_fn, TRAIN, collate, weights=torch.full((N,), float("nan")))
    with pytest.raises(DataError, match="batch_size 25 exceeds the 24"):
        SGDRecipe(batch_size=25).train(model_fn, TRAIN, collate)
    # a quadratic loss with a huge lr grows geometrically until it overflows
    diverging = SGDRecipe(lr=1e60, batch_size=8, epochs=2, loss=lambda model, b: (model(b["x"]) ** 2).sum(1))
    with pytest.raises(NonFiniteError, match="diverged; lower the recipe's lr"):
        diverging.train(model_fn, TRAIN, collate)
    with pytest.raises(NonFiniteError, match="diverged; lower the recipe's lr"):
        magic_scores(model_fn, TRAIN, QUERY, collate, diverging)
    bad = [dict(lr=0.0), dict(lr=float("inf")), dict(epochs=0), dict(batch_size=0), dict(schedule="step"),
           dict(warmup=-1), dict(momentum=1.0), dict(nesterov=True), dict(weight_decay=-1.0)]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            SGDRecipe(**kwargs)
    for kwargs in (dict(betas=(0.9, 1.0)), dict(eps=0.0)):
        with pytest.raises(ConfigError):
            AdamRecipe(**kwargs)
    for kwargs in (dict(query_batch=0), dict(segment=0), dict(segment=1.5)):
        with pytest.raises(ConfigError):
            magic_scores(model_fn, TRAIN, QUERY, collate, recipe, **kwargs)
    with pytest.raises(ConfigError, match="BatchNorm"):
        recipe.train(lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double(), TRAIN, collate)
    with pytest.raises(ConfigError, match="nn.Module"):
        recipe.train(lambda: "model", TRAIN, collate)
    with pytest.raises(ShapeError, match="'label'"):
        SGDRecipe(batch_size=8, loss=lambda model, b: F.cross_entropy(model(b["x"]), b["label"])).train(model_fn, TRAIN, collate)
    with pytest.raises(ShapeError, match="one value per example"):
        SGDRecipe(batch_size=8, loss=lambda model, b: F.cross_entropy(model(b["x"]), b["y"])).train(model_fn, TRAIN, collate)
    assert issubclass(ShapeError, TDAError)


# ---- counterfactual sanity (slow) -----------------------------------------------------------------
@pytest.mark.slow
def test_small_drop_lds_is_high() -> None:
    """Drop random 1% subsets, retrain with the same recipe and seed: the change in f is predicted
    by minus the summed scores of the dropped examples (linearity holds for small drops)."""
    n, subsets = 300, 20
    train, query = make_rows(n, seed=3), make_rows(8, seed=4)
    recipe = SGDRecipe(epochs=3, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=30, schedule="cosine")
    scores = magic_scores(model_fn, train, query, collate, recipe, query_batch=8)
    base = outputs(recipe.train(model_fn, train, collate), query).numpy()
    gen = np.random.default_rng(0)
    predicted, actual = [], []
    for _ in range(subsets):
        drop = gen.choice(n, size=n // 100, replace=False)
        w = torch.ones(n, dtype=torch.float64)
        w[drop] = 0.0
        actual.append(outputs(recipe.train(model_fn, train, collate, weights=w), query).numpy() - base)
        predicted.append(-scores[:, drop].sum(axis=1))
    predicted, actual = np.array(predicted), np.array(actual)  # (subsets, queries)
    corr = [np.corrcoef(predicted[:, j], actual[:, j])[0, 1] for j in range(len(query))]
    assert np.mean(corr) > 0.9, corr
