"""One API for every scorer: ``tda.Attributor(..., scorer=name)`` with fit / scores / top_k /
self_influence over a ``datasets.Dataset``, tensors, a PyTorch ``Dataset`` or a ``DataLoader``;
each compared with its reference (the explicit collate, the scorer object, EKFACAttributor,
magic_scores, a float64 loop of loss gradients)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import tda
from tda.errors import ConfigError, DataError, TDAError
from tda.projections.projectors import Projector

N, D, C, K = 24, 5, 3, 16


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, C))


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N + 4, D, generator=g), torch.randint(0, C, (N + 4,), generator=g)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(_model().state_dict())
    table = datasets.Dataset.from_dict({"f": x.tolist(), "label": y.tolist()})
    return x, y, ckpts, table


def _collate(cols):
    """The explicit collate of the table: float rows and integer labels, nothing else."""
    return {"x": torch.tensor(np.stack([np.asarray(r, np.float32) for r in cols["f"]])),
            "y": torch.tensor(np.asarray(cols["label"], np.int64))}


def _attr(ckpts, collate=None, **kw) -> tda.Attributor:
    return tda.Attributor(_model(), ckpts, collate, k=K, batch_size=5, projection="dense", **kw)


def test_tensors_datasets_and_loaders_give_the_explicit_collates_features(setup) -> None:
    x, y, ckpts, table = setup
    want = _attr(ckpts, _collate).featurize(table.select(range(N))).feats
    sources = {"mapping": {"x": x[:N], "y": y[:N]}, "pair": (x[:N], y[:N]),
               "torch dataset": TensorDataset(x[:N], y[:N]),
               "loader": DataLoader(TensorDataset(x[:N], y[:N]), batch_size=7, shuffle=False),
               "numpy mapping": {"x": x[:N].numpy(), "y": y[:N].numpy()}}
    for name, data in sources.items():
        block = _attr(ckpts).featurize(data)
        np.testing.assert_array_equal(block.ids, np.arange(N))
        np.testing.assert_allclose(block.feats, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_bad_data_is_named(setup) -> None:
    x, y, ckpts, table = setup
    with pytest.raises(DataError, match="shuffle=False"):
        _attr(ckpts).featurize(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    with pytest.raises(DataError, match="different numbers of examples"):
        _attr(ckpts).featurize({"x": x, "y": y[:3]})
    with pytest.raises(DataError, match="pass a pair"):
        _attr(ckpts).featurize((x, y, y))
    with pytest.raises(DataError, match="needs a collate"):
        _attr(ckpts).featurize(table)
    with pytest.raises(DataError, match="cannot read int"):
        _attr(ckpts).featurize(3)


def test_scorers_by_name_equal_their_objects(setup) -> None:
    x, y, ckpts, _ = setup
    train, query = (x[:N], y[:N]), (x[N:], y[N:])
    pairs = {"trak": tda.TRAKScorer(), "tracin": tda.TracInCPScorer([1.0, 1.0]), "graddot": tda.GradDotScorer(),
             "gradcos": tda.GradCosScorer()}
    for name, obj in pairs.items():
        by_name = _attr(ckpts, scorer=name).fit(train).scores(query)
        np.testing.assert_allclose(by_name, _attr(ckpts, scorer=obj).fit(train).scores(query), rtol=1e-6,
                                   atol=1e-9, err_msg=name)
    lrs = _attr(ckpts, scorer="tracin", scorer_options={"learning_rates": [0.5, 2.0]}).fit(train).scores(query)
    np.testing.assert_allclose(lrs, _attr(ckpts, scorer=tda.TracInCPScorer([0.5, 2.0])).fit(train).scores(query),
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="choose one of"):
        _attr(ckpts, scorer="trakk")
    with pytest.raises(ConfigError, match="representations"):
        _attr(ckpts, scorer="repsim")


def test_self_influence_of_the_output_is_the_score_diagonal(setup) -> None:
    x, y, ckpts, _ = setup
    train = (x[:N], y[:N])
    for name in ("trak", "tracin", "graddot"):
        attr = _attr(ckpts, scorer=name).fit(train)
        ids, si = attr.self_influence()
        np.testing.assert_array_equal(ids, np.arange(N))
        np.testing.assert_allclose(si, np.diag(attr.scores(train)), rtol=1e-4, atol=1e-6, err_msg=name)


def test_tracin_self_influence_of_the_loss_equals_a_float64_loop(setup) -> None:
    """sum over checkpoints of lr_c ||P_c grad_theta CE(z_i)||^2, the loss gradient formed per example."""
    x, y, ckpts, _ = setup
    lrs = [0.5, 2.0]
    attr = _attr(ckpts, scorer="tracin", scorer_options={"learning_rates": lrs}).fit((x[:N], y[:N]))
    _, got = attr.self_influence(target="loss")
    model = _model().double()
    dim = sum(p.numel() for p in model.parameters())
    want = np.zeros(N)
    for c, state in enumerate(ckpts):
        model.load_state_dict({k: v.double() for k, v in state.items()})
        proj = Projector(dim, K, seed=0)
        for i in range(N):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1].double()), y[i:i + 1]).backward()
            flat = torch.cat([p.grad.flatten() for p in model.parameters()]).float()[None]
            want[i] += lrs[c] * float((proj.project(flat, c).double() ** 2).sum())
    np.testing.assert_allclose(got, want, rtol=1e-3)
    with pytest.raises(ConfigError, match="'output' or 'loss'"):
        attr.self_influence(target="margin")


def test_ekfac_through_the_attributor_equals_ekfac_attributor(setup) -> None:
    from tda.scorers.ekfac.features import EKFACAttributor

    x, y, ckpts, _ = setup
    train, query = {"x": x[:N], "y": y[:N]}, {"x": x[N:], "y": y[N:]}
    attr = tda.Attributor(_model(), ckpts, scorer="ekfac", k_in=None, k_out=None, batch_size=8,
                          scorer_options={"fisher": "empirical"}).fit(train)
    ref = EKFACAttributor(_model(), ckpts, None, k_in=None, k_out=None, fisher="empirical", batch_size=8).fit(train)
    np.testing.assert_allclose(attr.scores(query), ref.scores(query), rtol=1e-5, atol=1e-8)
    top = attr.top_k(query, k=3)
    np.testing.assert_array_equal(top.proponent_ids, ref.top_k(query, k=3).proponent_ids)
    ids, si = attr.self_influence()
    full = ref.scores(train)
    np.testing.assert_array_equal(ids, np.arange(N))
    np.testing.assert_allclose(si, np.diag(full), rtol=1e-4, atol=1e-8)
    assert attr.projection == "factored"
    with pytest.raises(TDAError, match="featurizes its own way"):
        attr.featurize(train)


def test_magic_through_the_attributor_equals_magic_scores(setup) -> None:
    from tda.scorers.magic import SGDRecipe, magic_scores

    x, y, _, _ = setup
    recipe = SGDRecipe(epochs=2, lr=0.1, momentum=0.9, batch_size=8, seed=0)
    train, query = {"x": x[:N].double(), "y": y[:N]}, {"x": x[N:].double(), "y": y[N:]}

    def build():
        return _model().double()

    attr = tda.Attributor(_model(), [], scorer="magic", scorer_options={"model_fn": build, "recipe": recipe})
    got = attr.fit(train).scores(query)
    want = magic_scores(build, train, query, lambda b: b, recipe)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    top = attr.top_k(query, k=2)
    np.testing.assert_array_equal(top.proponent_ids, np.argsort(-want, axis=1, kind="stable")[:, :2])
    with pytest.raises(ConfigError, match="model_fn"):
        tda.Attributor(_model(), [], scorer="magic")
