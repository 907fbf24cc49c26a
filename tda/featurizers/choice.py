"""The default projection, ``"auto"``, for any model: chosen by what the model is, not by its name.

The measured rule (docs/benchmarks/projections.md, "Default projection": ``benchmarks/projections.py`` on an MNIST MLP,
a CIFAR-2 CNN and a character-level GPT-2) is the fastest projection whose LDS is within 0.02
of the dense projection's at equal width: TensorSketch, which never forms a per-example
gradient. It applies wherever it covers the whole gradient, so ``auto`` is

- ``tensorsketch`` when every trainable parameter sits in a layer it sketches
  (:func:`tda.projections.sketch_layers.tensorsketch_selection`) *and* its captures reproduce autograd's
  per-example gradient norms on the first rows of a real batch
  (:meth:`tda.featurizers.factored.FactoredFeaturizer.verify_captures`: a model that uses a weight outside
  its module, or changes a layer's input after the layer, fails here);
- ``sparse`` otherwise (it differentiates the whole model, so it covers anything autograd
  does), with the reason logged as a warning.

A ``param_names`` selection keeps ``sparse``: it names parameters, while tensorsketch selects
modules, so the same list would mean something else under each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from tda.errors import ConfigError, DataError, ShapeError, TDAError
from tda.featurizers.factored import FactoredFeaturizer
from tda.featurizers.gradient import apply_checkpoint, load_checkpoint
from tda.projections.sketch_layers import tensorsketch_selection
from tda.models.tasks import Batch, Task

logger = logging.getLogger(__name__)

#: what ``auto`` falls back to: the projection of the flat gradient, which covers every model
FALLBACK = "sparse"


@dataclass(frozen=True)
class ProjectionChoice:
    """The projection ``auto`` resolved to, and why (one line, for logs and summaries)."""

    projection: str
    reason: str


def structural_choice(model: nn.Module, param_names: Sequence[str] | None = None) -> ProjectionChoice:
    """``auto`` from the model's layers alone (no data): tensorsketch if it covers every
    trainable parameter, else sparse. :func:`choose_projection` adds the check on a batch."""
    if param_names is not None:
        return ProjectionChoice(FALLBACK, "featurize.params names parameters (set featurize.projection: "
                                          "tensorsketch to select modules instead)")
    try:
        tensorsketch_selection(model, None)
    except ConfigError as exc:
        return ProjectionChoice(FALLBACK, f"tensorsketch does not cover this model ({_short(exc)})")
    return ProjectionChoice("tensorsketch", "it covers every trainable parameter")


def choose_projection(model: nn.Module, task: Task, batch: Batch, param_names: Sequence[str] | None = None,
                      state: Mapping[str, Tensor] | str | Path | None = None,
                      device: str | torch.device | None = None) -> ProjectionChoice:
    """Resolve ``auto`` for ``model`` (see the module docstring).

    Args:
        model: the network (changed: ``state`` is loaded into it, it is moved to ``device``;
            pass a copy if that matters).
        task: the output function the features are gradients of.
        batch: a batch of the training data through the configured collate; its first two rows
            are checked.
        param_names: the featurizer's parameter selection (``None``: all).
        state: weights to check under (a trained checkpoint: at initialisation some gradients
            can vanish); ``None`` keeps the model's.
        device: where to run the check (default: the model's).
    """
    first = structural_choice(model, param_names)
    if first.projection == FALLBACK:
        logger.warning("featurize.projection auto: %s, because %s", FALLBACK, first.reason)
        return first
    if state is not None:
        apply_checkpoint(model, load_checkpoint(state), "the checkpoint the projection is checked under")
    try:
        featurizer = FactoredFeaturizer(model, task, projection="tensorsketch", k=64, device=device)
        rows = {key: value[: featurizer.VERIFY_ROWS].to(featurizer.device) for key, value in batch.items()}
        featurizer.verify_captures(rows)
    except (ConfigError, ShapeError) as exc:
        reason = f"its captures do not reproduce this model's per-example gradient ({_short(exc)})"
    except (DataError, TDAError):
        raise
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:  # hooks the model's code does not allow
        reason = f"capturing this model's layers failed ({type(exc).__name__}: {_short(exc)})"
    else:
        return ProjectionChoice("tensorsketch", "it covers every trainable parameter and its captures match "
                                                "autograd's per-example gradient norms on the first batch")
    logger.warning("featurize.projection auto: %s, because tensorsketch %s", FALLBACK, reason)
    return ProjectionChoice(FALLBACK, "tensorsketch " + reason)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["FALLBACK", "ProjectionChoice", "choose_projection", "structural_choice"]
