"""Output functions (docs/methods.md section 1): the classification margin and Q."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tda.errors import ShapeError
from tda.models.tasks import ClassificationTask, Task, classification_loss_weight, classification_margin


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_margin_equals_log_odds_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(64, 5, generator=gen)
    y = torch.randint(0, 5, (64,), generator=gen)
    p = _softmax64(logits.double().numpy())[np.arange(64), y.numpy()]
    ref = np.log(p / (1.0 - p))
    got = classification_margin(logits, y)
    assert got.shape == (64,)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    # float64 inputs stay float64 and agree to float64 precision
    got64 = classification_margin(logits.double(), y)
    np.testing.assert_allclose(got64.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_margin_is_finite_where_p_rounds_to_one() -> None:
    logits = torch.tensor([[100.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 200.0, -50.0]])
    y = torch.tensor([0, 1, 1])
    # p_y is exactly 1.0 in float32 for the first row, so log(p / (1 - p)) would be inf
    assert torch.softmax(logits, 1)[0, 0] == 1.0
    got = classification_margin(logits, y)
    assert torch.isfinite(got).all()
    expected = torch.tensor([100.0 - np.log(2.0), 0.0 - np.logaddexp(100.0, 0.0),
                             200.0 - np.logaddexp(0.0, -50.0)])
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-5)
    # the gradient is finite too (features are gradients of this output)
    logits.requires_grad_(True)
    classification_margin(logits, y).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_weight_is_one_minus_true_class_probability() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 2.0 * torch.randn(32, 4, generator=gen)
    y = torch.randint(0, 4, (32,), generator=gen)
    ref = 1.0 - _softmax64(logits.double().numpy())[np.arange(32), y.numpy()]
    q = classification_loss_weight(logits, y)
    assert q.shape == (32,)
    np.testing.assert_allclose(q.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert ((q >= 0) & (q <= 1)).all()
    # Q uses the TRUE label, not the predicted one: a confidently wrong example has Q ~ 1
    wrong = classification_loss_weight(torch.tensor([[10.0, -10.0]]), torch.tensor([1]))
    assert wrong.item() == pytest.approx(1.0, abs=1e-6)


def test_task_calls_model_on_named_columns() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    batch = {"pixels": torch.randn(6, 4), "target": torch.tensor([0, 1, 2, 0, 1, 2])}
    task = ClassificationTask(input_key="pixels", label_key="target")
    with torch.no_grad():
        logits = lin(batch["pixels"])
        torch.testing.assert_close(task.output(lin, batch), classification_margin(logits, batch["target"]))
        torch.testing.assert_close(task.loss_weight(lin, batch),
                                   classification_loss_weight(logits, batch["target"]))
    with pytest.raises(ShapeError, match="batch has no 'x' entry"):
        ClassificationTask().output(lin, batch)


def test_default_loss_weight_is_ones() -> None:
    class Identity(Task):
        def output(self, model, batch):
            return batch["x"].sum(1)

    q = Identity().loss_weight(lambda v: v, {"x": torch.zeros(5, 2)})
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, torch.ones(5))


@pytest.mark.parametrize(
    ("logits", "y", "match"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), r"logits of shape \(B, C\)"),
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), r"labels of shape \(B,\)"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), r"got \(4, 3\) and \(5,\)"),
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "at least 2 classes"),
    ],
)
def test_bad_shapes_raise(logits: torch.Tensor, y: torch.Tensor, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        classification_margin(logits, y)
    with pytest.raises(ShapeError, match=match):
        classification_loss_weight(logits, y)


def test_q_from_the_capture_forward_equals_the_task_loss_weight() -> None:
    """Tensorsketch / factored features take Q from the captures' forward pass (one pass for f
    and Q); it equals the task's own loss_weight, and a subclass's own Q is still used."""
    import numpy as np
    from torch import nn

    from tda.featurizers.factored import FactoredFeaturizer
    from tda.models.tasks import ClassificationTask

    class Halved(ClassificationTask):
        def loss_weight(self, model, batch):
            return 0.5 * super().loss_weight(model, batch)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batch = {"x": torch.randn(9, 4), "y": torch.randint(0, 3, (9,))}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for task in (ClassificationTask(), Halved()):
        for projection in ("tensorsketch", "factored"):
            feat = FactoredFeaturizer(model, task, projection=projection, k=16, k_in=4, k_out=4)
            (_, _, q), = list(feat.featurize(state, 0, [(np.arange(9), batch)]))
            with torch.no_grad():
                want = task.loss_weight(model.eval(), batch).numpy()
            np.testing.assert_allclose(q, want, rtol=1e-6, atol=1e-7)
