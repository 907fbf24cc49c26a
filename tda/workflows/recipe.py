"""A generic, seeded training recipe for any model and task: retraining without writing code.

:class:`TrainRecipe` trains ``make_model()`` on a collated training set by minimising the mean
(or data-weighted mean) of :meth:`tda.models.tasks.Task.example_loss` -- cross-entropy for a
classifier, the mean next-token loss for a causal LM -- with SGD (momentum), Adam or AdamW and a
per-step learning-rate schedule. Everything random is seeded by ``seed``: the initialisation
(``torch.manual_seed(seed)`` before ``make_model()``), the batch order (a ``torch.Generator``)
and dropout. ``init_state`` starts from given weights (fine-tuning) instead of the fresh
initialisation.

Schedules (step ``s`` of ``S = epochs * ceil(n / batch_size)``, after ``warmup_steps`` linear
warm-up ``s / warmup_steps``, as in Hugging Face's): ``constant``; ``linear`` to 0 at the end (Hugging Face's); ``cosine`` (half a cosine to
0); ``epoch-linear``: ``lr * (1 - epoch / epochs)`` for the whole epoch (the demo classifier's
recipe). Data weights ``w`` (the small-drop protocol): step ``t`` minimises
``sum_{i in B_t} w_i loss_i / |B_t|``, so a zero weight drops an example while the batches,
their order and the initialisation stay those of the full run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from tda.errors import ConfigError, DataError, NonFiniteError
from tda.featurizers.gradient import apply_checkpoint
from tda.models.tasks import Task

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine", "epoch-linear")


@dataclass(frozen=True)
class TrainRecipe:
    """The recipe's settings (see the module docstring); picklable, recorded with its results."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "linear"
    warmup_steps: int = 0
    epochs: int = 4
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer is {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule is {self.schedule!r}; choose one of {SCHEDULES}")
        if not self.lr > 0 or self.epochs < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ConfigError(f"train.lr must be > 0, train.epochs and train.batch_size >= 1 and train.warmup_steps "
                              f">= 0; got {self.lr}, {self.epochs}, {self.batch_size}, {self.warmup_steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def steps(self, n: int) -> int:
        """Optimizer steps of a run on ``n`` examples."""
        return self.epochs * math.ceil(n / self.batch_size)

    def lr_factor(self, step: int, total: int, epoch: int) -> float:
        """The multiplier of ``lr`` at optimizer ``step`` (0-based) of ``total``, in ``epoch``."""
        if step < self.warmup_steps:  # Hugging Face's warm-up: the first step runs at lr 0
            return step / self.warmup_steps
        if self.schedule == "epoch-linear":
            return 1.0 - epoch / self.epochs
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        if self.schedule == "linear":
            return 1.0 - progress
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def train(self, make_model: Callable[[], nn.Module], data: Mapping[str, Tensor], task: Task,
              weights: Tensor | None = None, init_state: Mapping[str, Tensor] | None = None,
              on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
        """Train a fresh (or ``init_state``) model on ``data`` (a collated dict of (n, ...)
        tensors); returns it in eval mode. ``weights``: (n,) data weights (None: all 1)."""
        n = _rows(data)
        if weights is not None and tuple(weights.shape) != (n,):
            raise DataError(f"weights must have one value per training example, shape ({n},), got {tuple(weights.shape)}")
        torch.manual_seed(self.seed)
        model = make_model()
        if init_state is not None:
            apply_checkpoint(model, init_state, "the recipe's initial weights")
        opt, gen, total, step = self.make_optimizer(model.parameters()), torch.Generator().manual_seed(self.seed), \
            self.steps(n), 0
        for epoch in range(self.epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            for lo in range(0, n, self.batch_size):
                idx = order[lo: lo + self.batch_size]
                for group in opt.param_groups:
                    group["lr"] = self.lr * self.lr_factor(step, total, epoch)
                self._step(model, opt, task, {k: v[idx] for k, v in data.items()},
                           None if weights is None else weights[idx], epoch)
                step += 1
            if on_epoch is not None:
                on_epoch(epoch, model)
        return model.eval()

    def _step(self, model: nn.Module, opt: torch.optim.Optimizer, task: Task, batch: dict[str, Tensor],
              w: Tensor | None, epoch: int) -> None:
        losses = task.example_loss(model, batch)  # (B,)
        loss = losses.mean() if w is None else (w.to(losses.dtype) * losses).sum() / len(losses)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"training diverged: the loss became {loss.item()} in epoch {epoch} (train.lr is "
                                 f"{self.lr:g}); lower train.lr and rerun")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _rows(data: Mapping[str, Tensor]) -> int:
    sizes = {k: int(v.shape[0]) for k, v in data.items() if isinstance(v, Tensor) and v.ndim}
    if not sizes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise DataError(f"training needs a non-empty batch whose entries have equal numbers of rows, got {sizes}")
    return next(iter(sizes.values()))


__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainRecipe"]
