"""Deterministic training recipes whose every step is a pure, differentiable function.

A recipe fixes everything about a training run (docs/methods.md section 8, MAGIC): the model's
initialisation (``torch.manual_seed(seed)`` before ``model_fn()``), the batch order (one
``torch.randperm`` per epoch from a generator seeded with ``seed``), the learning-rate schedule and
the optimizer. Step t on batch B_t with per-example data weights w minimises

    L_t(theta) = sum_{i in B_t} w_i * loss_i(theta) / |B_t|

(|B_t| the number of rows in the batch, so w = 1 gives the usual mean loss), and updates the state
exactly like ``torch.optim.SGD`` / ``torch.optim.Adam`` with a ``LambdaLR`` schedule would. The
update is written out in plain tensor operations so the reverse pass (:mod:`.metagradients`) can
differentiate it, weight decay, momentum, the schedule and Adam's bias correction and eps included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tda.errors import ConfigError, DataError, NonFiniteError, ShapeError
from tda.scorers.magic.functional import CrossEntropyLoss, FunctionalModel, LossFn, State, TrainData, build_model, check_weights

SCHEDULES = ("constant", "cosine", "linear", "epoch-linear")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Shared options of a deterministic training run (subclasses add the optimizer).

    Args:
        epochs: passes over the training set.
        lr: peak learning rate.
        weight_decay: L2 penalty coefficient (added to the gradient, as ``torch.optim`` does).
        batch_size: rows per step; must not exceed the training-set size.
        seed: seeds the initialisation (``model_fn`` runs under ``torch.manual_seed(seed)``) and
            the batch order (a generator seeded with ``seed`` draws one permutation per epoch).
        schedule: ``"constant"``, ``"cosine"`` (to 0) or ``"linear"`` (to 0) after the warm-up, or
            ``"epoch-linear"``: ``lr * (1 - e / epochs)`` through epoch e (``LambdaLR`` stepped once per
            epoch, the classifier family's recipe).
        warmup: steps of linear warm-up, ``lr * (t + 1) / warmup`` at step t.
        drop_last: drop each epoch's last incomplete batch (else it is a smaller batch).
        loss: per-example training loss ``loss(model_call, batch) -> (B,)``, default cross-entropy
            of ``batch["x"]`` against ``batch["y"]``.
    """

    epochs: int = 1
    lr: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0
    schedule: str = "constant"
    warmup: int = 0
    drop_last: bool = False
    loss: LossFn = field(default_factory=CrossEntropyLoss)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer number of steps >= 0, got {self.warmup!r}")
        if not callable(self.loss):
            raise ConfigError(f"loss must be a callable loss(model_call, batch) -> (B,), got {self.loss!r}")

    # ---- the run's fixed plan -------------------------------------------------------------------
    def plan(self, n: int) -> list[Tensor]:
        """Row positions of every step's batch, epoch after epoch: a list of (B_t,) int64 tensors."""
        if n < 1:
            raise DataError("the training set is empty (0 rows); pass at least one example")
        if self.batch_size > n:
            raise DataError(f"batch_size {self.batch_size} exceeds the {n} training examples; lower batch_size")
        gen = torch.Generator().manual_seed(self.seed)
        steps: list[Tensor] = []
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            stop = n - n % self.batch_size if self.drop_last else n
            steps += list(perm[:stop].split(self.batch_size))
        return steps

    def lr_at(self, t: int, total: int) -> float:
        """Learning rate of step ``t`` (0-based) of ``total``."""
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.schedule == "epoch-linear":
            return self.lr * (1.0 - (t // max(1, total // self.epochs)) / self.epochs)
        frac = (t - self.warmup) / max(1, total - self.warmup)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return float(self.lr)

    # ---- the optimizer (subclasses) -------------------------------------------------------------
    def init_state(self, params: tuple[Tensor, ...]) -> State:
        """The state before step 0: ``(params, *buffers)``."""
        raise NotImplementedError

    def update(self, state: State, grads: tuple[Tensor, ...], lr: float, step: int) -> State:
        """One optimizer update (``step`` counts from 1) as a pure function of ``(state, grads)``."""
        raise NotImplementedError

    # ---- one step and a run ---------------------------------------------------------------------
    def gradients(self, fm: FunctionalModel, params: tuple[Tensor, ...], batch: dict[str, Tensor],
                  w_b: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """``(grad L_t(params), L_t)`` of the weighted batch loss (module docstring)."""

        def objective(p: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
            try:
                per = self.loss(fm.call(p), batch)
            except KeyError as exc:
                raise ShapeError(f"the recipe's loss reads batch key {exc}, which the collate does not produce "
                                 f"(it gives {sorted(batch)}); rename the key in the loss or the collate") from None
            if per.shape != w_b.shape:
                raise ShapeError(f"the recipe's loss must return one value per example, shape {tuple(w_b.shape)}, "
                                 f"got {tuple(per.shape)}; use reduction='none'")
            total = (w_b * per).sum() / per.shape[0]
            return total, total.detach()

        return torch.func.grad(objective, has_aux=True)(params)

    def step(self, fm: FunctionalModel, state: State, batch: dict[str, Tensor], w_b: Tensor,
             t: int, total: int) -> tuple[State, Tensor]:
        """State after step ``t`` of ``total`` on ``batch`` with weights ``w_b`` (B_t,), and its loss."""
        grads, loss = self.gradients(fm, state[0], batch, w_b)
        return self.update(state, grads, self.lr_at(t, total), t + 1), loss

    def run(self, fm: FunctionalModel, data: TrainData, w: Tensor, plan: Sequence[Tensor], state: State,
            start: int, stop: int, on_state: Callable[[int, State], Any] | None = None,
            bar: tqdm | None = None) -> State:
        """Steps ``start .. stop-1`` from ``state`` (without autograd); ``on_state(t, s)`` sees each
        step's input state. Raises :class:`NonFiniteError` (lower lr) when the loss diverges."""
        with torch.no_grad():
            for t in range(start, stop):
                if on_state is not None:
                    on_state(t, state)
                idx = plan[t].to(fm.device)
                state, loss = self.step(fm, state, data.batch(idx), w[idx], t, len(plan))
                if not math.isfinite(float(loss)):
                    raise NonFiniteError(f"the training loss is {float(loss)} at step {t} of {len(plan)}: training "
                                         f"diverged; lower the recipe's lr (now {self.lr})")
                if bar is not None:
                    bar.update(1)
        if not all(torch.isfinite(p).all() for p in state[0]):
            raise NonFiniteError(f"the parameters became NaN or infinite by step {stop}: training diverged; lower "
                                 f"the recipe's lr (now {self.lr})")
        return state

    def train(self, model_fn: Callable[[], nn.Module], train_ds: Any, collate: Callable,
              weights: Tensor | None = None, progress: bool = False) -> dict[str, Tensor]:
        """Train a fresh ``model_fn()`` with per-example data ``weights`` (n,) (``None``: ones).

        Returns:
            The trained model's ``state_dict`` (buffers and frozen parameters as initialised).
        """
        fm = build_model(model_fn, self.seed)
        data = TrainData(train_ds, collate, fm, "training")
        w = check_weights(weights, data.n, fm)
        plan = self.plan(data.n)
        with tqdm(total=len(plan), desc="train", unit="step", disable=not progress) as bar:
            state = self.run(fm, data, w, plan, self.init_state(fm.initial), 0, len(plan), bar=bar)
        return fm.state_dict(state[0])


@dataclass(frozen=True, kw_only=True)
class SGDRecipe(Recipe):
    """SGD as ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` (dampening 0).

    ``g = grad L_t + weight_decay * theta``; ``v = momentum * v + g`` (v = 0 before step 0, so
    the first step has v = g); ``theta -= lr_t * (g + momentum * v if nesterov else v)``.
    """

    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")

    def init_state(self, params: tuple[Tensor, ...]) -> State:
        if self.momentum == 0:
            return (params,)
        return (params, tuple(torch.zeros_like(p) for p in params))

    def update(self, state: State, grads: tuple[Tensor, ...], lr: float, step: int) -> State:
        params = state[0]
        if self.weight_decay:
            grads = tuple(g + self.weight_decay * p for g, p in zip(grads, params))
        if self.momentum == 0:
            return (tuple(p - lr * g for p, g in zip(params, grads)),)
        bufs = tuple(self.momentum * v + g for v, g in zip(state[1], grads))
        dirs = tuple(g + self.momentum * v for g, v in zip(grads, bufs)) if self.nesterov else bufs
        return (tuple(p - lr * d for p, d in zip(params, dirs)), bufs)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for x >= 0 with derivative 0 (not infinity) at x = 0.

    Adam's second moment is exactly 0 only where every gradient so far was 0; there the first
    moment is 0 too and the true derivative of the update through ``sqrt(v)`` is 0 (the limit),
    while autograd's ``inf * 0`` would give NaN.
    """
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


@dataclass(frozen=True, kw_only=True)
class AdamRecipe(Recipe):
    """Adam as ``torch.optim.Adam(lr, betas, eps, weight_decay, decoupled_weight_decay)``.

    ``g = grad L_t (+ weight_decay * theta unless decoupled)``; ``m = b1 m + (1 - b1) g``;
    ``v = b2 v + (1 - b2) g^2``; ``theta -= lr_t * (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps)``
    at update k = t + 1; decoupled (AdamW) decay first scales ``theta *= 1 - lr_t * weight_decay``.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ConfigError(f"eps must be > 0, got {self.eps!r}")

    def init_state(self, params: tuple[Tensor, ...]) -> State:
        zeros = tuple(torch.zeros_like(p) for p in params)
        return (params, zeros, zeros)

    def update(self, state: State, grads: tuple[Tensor, ...], lr: float, step: int) -> State:
        params, m, v = state
        b1, b2 = self.betas
        if self.weight_decay and not self.decoupled_weight_decay:
            grads = tuple(g + self.weight_decay * p for g, p in zip(grads, params))
        if self.weight_decay and self.decoupled_weight_decay:
            params = tuple(p * (1.0 - lr * self.weight_decay) for p in params)
        m = tuple(b1 * mi + (1.0 - b1) * g for mi, g in zip(m, grads))
        v = tuple(b2 * vi + (1.0 - b2) * g * g for vi, g in zip(v, grads))
        c1, c2 = 1.0 - b1 ** step, 1.0 - b2 ** step
        new = tuple(p - lr * (mi / c1) / (_safe_sqrt(vi / c2) + self.eps) for p, mi, vi in zip(params, m, v))
        return (new, m, v)
