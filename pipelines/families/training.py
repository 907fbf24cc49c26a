"""The training recipe of the ``classifier`` family's demo models (moved from ``tda/training.py``):
a seeded SGD run of the generic recipe (:func:`train_classifier`, :class:`tda.workflows.recipe.TrainRecipe`) and :func:`accuracy` (used by the demo, tests
and validators).

Deterministic given (seed, data order): the batch order comes from a ``torch.Generator`` seeded
with ``seed``, and initialisation from ``torch.manual_seed(seed)`` inside :func:`train_classifier`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from tda.errors import DataError
from tda.workflows.recipe import TrainRecipe
from tda.models.tasks import ClassificationTask

#: the recipe's optimizer settings (also those of its MAGIC replay, ``ClassifierFamily.magic_recipe``)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def _check_labels(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Labels must index the model's classes (else cross-entropy fails with a bare IndexError)."""
    with torch.no_grad():
        classes = model.eval()(x[:1]).shape[-1]  # eval: no dropout draw, the RNG stream is unchanged
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        raise DataError(f"{int(bad.sum())} training label(s) lie outside the model's {classes} classes (e.g. "
                        f"{y[bad][:5].tolist()}); fix the labels, or build the model with more outputs")


def train_classifier(
    make_model: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    epochs: int = 3,
    lr: float = 0.05,
    batch_size: int = 128,
    seed: int = 0,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    weights: Tensor | None = None,
) -> nn.Module:
    """Train ``make_model()`` with SGD (momentum) and a linear learning-rate decay on ``(x, y)``.

    Args:
        make_model: builds a fresh model (initialised after seeding).
        x: (n, ...) float inputs. y: (n,) int64 labels.
        on_epoch: called as ``on_epoch(epoch, model)`` after every epoch (e.g. to save a checkpoint).
        weights: (n,) per-example data weights (None: ones). Step t minimises
            ``sum_{i in B_t} w_i loss_i / |B_t|``, so a zero weight drops an example while every
            batch, the batch order and the initialisation stay those of the full run (the
            fixed-seed small-drop protocol; :class:`tda.scorers.magic.SGDRecipe` with ``schedule="epoch-linear"``
            trains the same run).

    Returns:
        The trained model in eval mode.
    """
    if len(x) == 0 or len(x) != len(y):
        raise DataError(f"training needs equal, non-zero numbers of inputs and labels, got {len(x)} and {len(y)}")

    def checked_model() -> nn.Module:
        model = make_model()
        _check_labels(model, x, y)
        return model

    # the generic recipe every model retrains with (tda.workflows.recipe), at the demo's settings: same route, same numbers
    recipe = TrainRecipe(optimizer="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay, schedule="epoch-linear",
                         epochs=epochs, batch_size=batch_size, seed=seed)
    return recipe.train(checked_model, {"x": x, "y": y}, ClassificationTask(), weights=weights, on_epoch=on_epoch)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    correct = 0
    for lo in range(0, len(x), batch_size):
        correct += int((model(x[lo: lo + batch_size]).argmax(1) == y[lo: lo + batch_size]).sum())
    return correct / max(len(x), 1)
