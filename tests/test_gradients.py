"""Per-example gradients against a float64 loop over single examples with torch.autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tda.errors import ConfigError, NonFiniteError
from tda.gradients.per_example import (check_finite, flatten_grads, loss_weights, parameter_count,
                           per_example_grads, select_parameters)
from tda.models.tasks import ClassificationTask, classification_loss_weight, classification_margin


def _loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    names: list[str] | None = None) -> torch.Tensor:
    """(B, d) float64 gradients of the margin, one example at a time, with torch.autograd."""
    ref_model = copy.deepcopy(model).double().eval()
    params = dict(ref_model.named_parameters())
    names = names or list(params)
    rows = []
    for i in range(x.shape[0]):
        out = classification_margin(ref_model(x[i: i + 1].double()), y[i: i + 1])
        grads = torch.autograd.grad(out.sum(), [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.fixture
def setup(make_mlp, tiny_data):
    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(6, in_dim=5, classes=3, seed=1)
    return model, {"x": x, "y": y}


def test_matches_float64_autograd_loop(setup) -> None:
    model, batch = setup
    task = ClassificationTask()
    names = select_parameters(model)
    grads = per_example_grads(model, task, batch)
    assert list(grads) == names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    flat = flatten_grads(grads, names)
    d = parameter_count(model, names)
    assert d == 5 * 7 + 7 + 7 * 3 + 3
    assert flat.shape == (6, d) and flat.dtype == torch.float32
    ref = _loop_reference(model, batch["x"], batch["y"])
    torch.testing.assert_close(flat.double(), ref, rtol=1e-5, atol=1e-6)
    # vmap'd gradients of the float64 model equal the loop to float64 precision
    model64 = copy.deepcopy(model).double()
    batch64 = {"x": batch["x"].double(), "y": batch["y"]}
    flat64 = flatten_grads(per_example_grads(model64, task, batch64), names)
    assert flat64.dtype == torch.float64
    torch.testing.assert_close(flat64, ref, rtol=1e-10, atol=1e-12)


def test_chunked_vmap_equals_unchunked(setup) -> None:
    model, batch = setup
    task = ClassificationTask()
    names = select_parameters(model)
    full = flatten_grads(per_example_grads(model, task, batch), names)
    chunked = flatten_grads(per_example_grads(model, task, batch, chunk_size=4), names)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-7)


def test_gradients_do_not_mix_examples(setup) -> None:
    model, batch = setup
    task = ClassificationTask()
    names = select_parameters(model)
    full = flatten_grads(per_example_grads(model, task, batch), names)
    first = flatten_grads(per_example_grads(model, task, {k: v[:1] for k, v in batch.items()}), names)
    torch.testing.assert_close(first[0], full[0], rtol=1e-6, atol=1e-7)


def test_parameter_subset_by_prefix_and_name(setup) -> None:
    model, batch = setup
    task = ClassificationTask()
    full = _loop_reference(model, batch["x"], batch["y"])
    # prefix "2" selects the last Linear layer only (weights 21 + bias 3, at the end of full)
    grads = per_example_grads(model, task, batch, names=["2"])
    assert list(grads) == ["2.weight", "2.bias"]
    assert grads["2.weight"].shape == (6, 3, 7)
    flat = flatten_grads(grads, ["2.weight", "2.bias"])
    torch.testing.assert_close(flat.double(), full[:, -24:], rtol=1e-5, atol=1e-6)
    # exact names, given out of model order, come back in model order
    assert select_parameters(model, ["2.bias", "0.weight"]) == ["0.weight", "2.bias"]
    bias_only = flatten_grads(per_example_grads(model, task, batch, names=["0.bias"]), ["0.bias"])
    torch.testing.assert_close(bias_only.double(), full[:, 35:42], rtol=1e-5, atol=1e-6)


def test_prefix_does_not_match_longer_names() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    assert select_parameters(model, ["1"]) == ["1.weight", "1.bias"]
    assert select_parameters(model, ["10"]) == ["10.weight", "10.bias"]


def test_frozen_parameters_are_not_selected(make_mlp) -> None:
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    assert select_parameters(model) == ["0.bias", "2.weight", "2.bias"]


def test_unknown_name_raises_config_error(setup) -> None:
    model, batch = setup
    with pytest.raises(ConfigError, match="'3' is not in the model"):
        select_parameters(model, ["3"])
    with pytest.raises(ConfigError, match="not in the model"):
        per_example_grads(model, ClassificationTask(), batch, names=["0.weight", "fc.weight"])


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored(make_mlp, tiny_data, training: bool) -> None:
    torch.manual_seed(0)
    # Dropout in train mode would make vmap fail (random op) and change gradients: gradients
    # must be taken in eval mode, and the caller's mode restored afterwards.
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3))
    model.train(training)
    x, y = tiny_data(4, in_dim=5, classes=3, seed=2)
    names = select_parameters(model)
    flat = flatten_grads(per_example_grads(model, ClassificationTask(), {"x": x, "y": y}), names)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    torch.testing.assert_close(flat.double(), _loop_reference(model, x, y), rtol=1e-5, atol=1e-6)
    q = loss_weights(model, ClassificationTask(), {"x": x, "y": y})
    assert model.training is training
    with torch.no_grad():
        torch.testing.assert_close(q, classification_loss_weight(model.eval()(x), y))


def test_mode_is_restored_after_an_error(make_mlp) -> None:
    model = make_mlp().train()
    with pytest.raises(Exception):
        bad_width = {"x": torch.zeros(2, 99), "y": torch.zeros(2, dtype=torch.long)}
        per_example_grads(model, ClassificationTask(), bad_width)
    assert model.training


def test_flatten_upcasts_half_precision() -> None:
    grads = {"a": torch.ones(2, 3, dtype=torch.float16), "b": torch.full((2, 1), 2.0, dtype=torch.float16)}
    flat = flatten_grads(grads, ["b", "a"])
    assert flat.dtype == torch.float32
    torch.testing.assert_close(flat, torch.tensor([[2.0, 1, 1, 1], [2.0, 1, 1, 1]]))


def test_check_finite_names_bad_examples() -> None:
    values = torch.ones(4, 3)
    values[2, 1] = float("nan")
    values[3, 0] = float("inf")
    check_finite(torch.ones(4, 3), [10, 11, 12, 13], "features")  # no error
    with pytest.raises(NonFiniteError, match=r"2 example\(s\), ids \[12, 13\]"):
        check_finite(values, [10, 11, 12, 13], "features")


def test_linear_path_matches_float64_loop(setup) -> None:
    """The batched outer-product path equals the float64 single-example loop."""
    from tda.gradients.per_example import linear_per_example_grads

    model, batch = setup
    names = select_parameters(model, None)
    ref = _loop_reference(model, batch["x"], batch["y"])
    got = linear_per_example_grads(copy.deepcopy(model).double(), ClassificationTask(),
                                   {"x": batch["x"].double(), "y": batch["y"]}, names)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    sub = select_parameters(model, ["2"])
    got = linear_per_example_grads(copy.deepcopy(model).double(), ClassificationTask(),
                                   {"x": batch["x"].double(), "y": batch["y"]}, sub)
    torch.testing.assert_close(got, ref[:, -parameter_count(model, sub):], rtol=1e-10, atol=1e-12)


class _TokenModel(nn.Module):
    """Linear layers applied per token, mean-pooled: (B, T, 4) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))).mean(dim=1)


def test_linear_path_sums_over_tokens_and_equals_vmap() -> None:
    from tda.gradients.per_example import linear_per_example_grads

    torch.manual_seed(0)
    model = _TokenModel().double()
    batch = {"x": torch.randn(5, 7, 4, dtype=torch.float64), "y": torch.randint(0, 3, (5,))}
    names = select_parameters(model, None)
    ref = flatten_grads(per_example_grads(model, ClassificationTask(), batch, names), names)
    got = linear_per_example_grads(model, ClassificationTask(), batch, names)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_linear_path_declines_other_layers_and_reused_layers(make_mlp) -> None:
    from tda.gradients.per_example import linear_per_example_grads

    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3))
    batch = {"x": torch.randn(4, 1, 5), "y": torch.randint(0, 3, (4,))}
    assert linear_per_example_grads(conv, ClassificationTask(), batch, select_parameters(conv, None)) is None

    shared = nn.Linear(3, 3)
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    batch = {"x": torch.randn(4, 3), "y": torch.randint(0, 3, (4,))}
    assert linear_per_example_grads(twice, ClassificationTask(), batch, select_parameters(twice, None)) is None


def test_featurizer_gradient_methods_agree(make_mlp, tiny_data) -> None:
    from tda.featurizers.gradient import Featurizer

    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(6, in_dim=5, classes=3, seed=1)
    a = Featurizer(copy.deepcopy(model), ClassificationTask(), k=16, grad_method="vmap")
    b = Featurizer(copy.deepcopy(model), ClassificationTask(), k=16)
    assert (a.grad_method, b.grad_method) == ("vmap", "linear")
    pa, _ = a.featurize_batch({"x": x, "y": y}, list(range(6)), 0)
    pb, _ = b.featurize_batch({"x": x, "y": y}, list(range(6)), 0)
    assert abs(pa - pb).max() < 1e-5
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3))
    with pytest.raises(ConfigError, match="grad_method 'linear' needs"):
        Featurizer(conv, ClassificationTask(), k=8, grad_method="linear")
    assert Featurizer(conv, ClassificationTask(), k=8).grad_method == "vmap"


def test_grouped_projection_equals_per_batch(make_mlp, tiny_data) -> None:
    """When P does not fit the cache, batches are projected in groups: same features and Q."""
    import numpy as np

    from tda.featurizers.gradient import Featurizer

    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(10, in_dim=5, classes=3, seed=1)
    batches = [(np.arange(lo, lo + 3)[: 10 - lo], {"x": x[lo: lo + 3], "y": y[lo: lo + 3]}) for lo in range(0, 10, 3)]
    plain = Featurizer(copy.deepcopy(model), ClassificationTask(), k=16)
    grouped = Featurizer(copy.deepcopy(model), ClassificationTask(), k=16, cache_bytes=0,
                         group_bytes=5 * plain.dim * 4)
    assert plain._group_rows() == 1 and grouped._group_rows() == 5
    a = list(plain.featurize(model.state_dict(), 0, batches))
    b = list(grouped.featurize(model.state_dict(), 0, batches))
    assert [len(i) for i, _, _ in b] == [3, 3, 3, 1]
    for (ia, pa, qa), (ib, pb, qb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.allclose(pa, pb, atol=1e-6) and np.array_equal(qa, qb)
