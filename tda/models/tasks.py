"""Output functions: what is attributed (docs/methods.md section 1).

A task turns a model call and a batch into the scalar measured output ``f(theta, z)`` per
example (differentiated to build features) and, for TRAK, the loss weight ``Q(theta, z)``.

Classification uses the margin ``f = logit_y - logsumexp_{j != y} logit_j`` (that is
``log(p_y / (1 - p_y))``), computed by masking the true logit with ``-inf`` so it stays finite
where ``p_y`` rounds to 1, and ``Q = 1 - softmax(logits)_y`` of the true label.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Mapping

import torch
from torch import Tensor

from tda.errors import ShapeError

Batch = Mapping[str, Tensor]
ModelCall = Callable[..., Tensor]


class Task(ABC):
    """An output function ``f`` (and optionally ``Q``) over batches of examples.

    Subclasses implement :meth:`output`; :meth:`loss_weight` defaults to 1 (docs/methods.md: "Q is 1
    when undefined").
    """

    #: Name recorded in store manifests so features of different tasks never mix.
    name: str = "task"
    #: What the task is, so capabilities follow it (predictions, losses, retraining): ``"classification"``
    #: (implements :meth:`logits`; labels in ``batch[label_key]``), ``"causal-lm"``, ``"diffusion"`` or ``"custom"``.
    kind: str = "custom"
    label_key: str | None = None

    def logits(self, model: ModelCall, batch: Batch) -> Tensor:
        """Class scores (B, C) of a classification task (others raise)."""
        raise ShapeError(f"the task {self.name!r} ({type(self).__name__}) has no class scores; only a "
                         "classification task (kind 'classification') does")

    def example_loss(self, model: ModelCall, batch: Batch) -> Tensor:
        """The training loss of each example, shape (B,), what a training recipe minimises:
        cross-entropy of :meth:`logits` for classification; LM tasks override it (mean token
        loss). Other tasks raise, naming what to implement."""
        if self.kind != "classification":
            raise ShapeError(f"the task {self.name!r} ({type(self).__name__}) defines no per-example training loss; "
                             "implement example_loss(model, batch) -> (B,) on it, or set train.factory to your own "
                             "training function")
        logits = self.logits(model, batch)
        return torch.nn.functional.cross_entropy(logits, batch[self.label_key].long(), reduction="none")

    @abstractmethod
    def output(self, model: ModelCall, batch: Batch) -> Tensor:
        """Measured output per example.

        Args:
            model: callable running the model on the task's inputs.
            batch: mapping of tensors with a leading batch dimension B.

        Returns:
            Tensor of shape (B,).
        """

    def loss_weight(self, model: ModelCall, batch: Batch) -> Tensor:
        """TRAK's ``Q = dLoss/df`` per example, shape (B,). Defaults to ones."""
        first = next(iter(batch.values()))
        return torch.ones(first.shape[0], dtype=torch.float32, device=first.device)

    def output_and_loss_weight(self, model: ModelCall, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """``f`` (B,) and, where one forward pass gives both, ``Q`` (B,) detached, else ``None``
        (then :meth:`loss_weight` is called). Classifiers override it to share the logits."""
        return self.output(model, batch), None

    def example_groups(self, batch: Batch) -> list[tuple[Tensor, Batch]]:
        """Split ``batch`` into groups whose examples can be run together, each as it would run alone.

        Per-example gradients and ``Q`` are computed group by group and put back in batch order.
        The default is one group, the batch as it is; a task for padded sequences (see
        :mod:`tda.models.hf`) returns one group per real length, trimmed of its padding.

        Returns:
            ``(rows, sub_batch)`` pairs: ``rows`` (n,) int64 positions in ``batch``, covering
            every example exactly once.
        """
        first = next(iter(batch.values()))
        return [(torch.arange(first.shape[0], device=first.device), batch)]


def _check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.ndim != 2 or y.ndim != 1 or logits.shape[0] != y.shape[0]:
        raise ShapeError(
            f"classification needs logits of shape (B, C) and labels of shape (B,), got "
            f"{tuple(logits.shape)} and {tuple(y.shape)}; make the model return one row of "
            "class scores per example"
        )
    if logits.shape[1] < 2:
        raise ShapeError(f"classification needs at least 2 classes, got {logits.shape[1]}")


def classification_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``logit_y - logsumexp_{j != y} logit_j`` per row. Shapes: (B, C), (B,) -> (B,)."""
    _check_logits(logits, y)
    classes = torch.arange(logits.shape[1], device=logits.device)
    true_mask = classes.unsqueeze(0) == y.long().unsqueeze(1)  # (B, C), vmap-safe one-hot
    true_logit = logits.gather(1, y.long().unsqueeze(1)).squeeze(1)  # (B,)
    others = logits.masked_fill(true_mask, float("-inf"))  # (B, C)
    return true_logit - torch.logsumexp(others, dim=1)


def classification_loss_weight(logits: Tensor, y: Tensor) -> Tensor:
    """``Q = 1 - softmax(logits)_y`` of the true label. Shapes: (B, C), (B,) -> (B,)."""
    _check_logits(logits, y)
    probs = torch.softmax(logits.float(), dim=1)
    return 1.0 - probs.gather(1, y.long().unsqueeze(1)).squeeze(1)


class MarginTask(Task):
    """A classifier attributed through its margin: subclasses give ``_logits(model, batch)`` (B, C)
    and ``label_key``; ``f`` is :func:`classification_margin`, ``Q`` :func:`classification_loss_weight`,
    both from one logits call (:meth:`output_and_loss_weight`)."""

    label_key: str
    kind = "classification"

    def _logits(self, model: ModelCall, batch: Batch) -> Tensor:
        raise NotImplementedError

    def logits(self, model: ModelCall, batch: Batch) -> Tensor:
        return self._logits(model, batch)

    def output(self, model: ModelCall, batch: Batch) -> Tensor:
        return classification_margin(self._logits(model, batch), batch[self.label_key])

    def loss_weight(self, model: ModelCall, batch: Batch) -> Tensor:
        return classification_loss_weight(self._logits(model, batch), batch[self.label_key])

    def output_and_loss_weight(self, model: ModelCall, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """f and Q from one logits call; a subclass with its own ``output`` or ``loss_weight`` gets
        ``(output, None)``, so its own Q is computed by :meth:`Task.loss_weight`."""
        if type(self).output is not MarginTask.output or type(self).loss_weight is not MarginTask.loss_weight:
            return self.output(model, batch), None
        logits = self._logits(model, batch)
        y = batch[self.label_key]
        return classification_margin(logits, y), classification_loss_weight(logits.detach(), y)


class ClassificationTask(MarginTask):
    """Margin output for a classifier taking ``batch[input_key]`` and labels ``batch[label_key]``."""

    name = "classification-margin"

    def __init__(self, input_key: str = "x", label_key: str = "y") -> None:
        self.input_key = input_key
        self.label_key = label_key

    def _logits(self, model: ModelCall, batch: Batch) -> Tensor:
        for key in (self.input_key, self.label_key):
            if key not in batch:
                raise ShapeError(
                    f"batch has no {key!r} entry (has {sorted(batch)}); pass "
                    f"ClassificationTask(input_key=..., label_key=...) naming your columns"
                )
        logits = model(batch[self.input_key])
        if not isinstance(logits, Tensor):
            hint = ("use tda.models.hf.HFClassificationTask, which passes input_ids with the attention mask and "
                    "unwraps .logits" if hasattr(logits, "logits") else "make the model return the logits tensor")
            raise ShapeError(f"the model returned a {type(logits).__name__}, not a (B, C) tensor of class scores; "
                             f"{hint}")
        return logits
