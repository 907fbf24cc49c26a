"""MAGIC scores: exact metagradients of query outputs through a whole training run.

docs/methods.md section 8 (Ilyas & Engstrom 2025). With per-example data weights w and the recipe's
deterministic run ``s_{t+1} = step_t(s_t, w_{B_t})`` (s = parameters and optimizer state, T
steps), the score of training example i for query j is

    tau_{j,i} = d f_j(theta_T) / d w_i   at w = 1 (or the given weights),

so ``tau > 0`` means more weight on i raises f_j. Reverse mode: the adjoint starts at
``a_T = (grad f_j(theta_T), 0 for the optimizer buffers)`` and goes back one step at a time,
``(a_t, g_t) = a_{t+1}^T d step_t / d (s_t, w_{B_t})`` (a vector-Jacobian product of the whole
optimizer step, second derivatives of the loss included); example i in B_t receives ``g_t``'s entry.
For plain SGD ``g_t`` is ``-(lr_t / |B_t|) <a_{t+1}, grad l_i(theta_t)>``.

REPLAY-style memory: the forward run keeps every k-th state (k = ceil(sqrt(T)) by default); the
reverse pass recomputes each segment of k steps from its stored start, then reverses it, so at most
``ceil(T / k) + k`` states are held (O(sqrt(T))). Queries are reversed ``query_batch`` at a time,
the vjp of each step ``torch.func.vmap``-ed over the chunk's adjoints.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tda.errors import ConfigError, NonFiniteError, ShapeError
from tda.models.tasks import ClassificationTask, Task
from tda.scorers.magic.functional import FunctionalModel, State, TrainData, build_model, check_weights
from tda.scorers.magic.recipes import Recipe


def segment_length(segment: int | None, total: int) -> int:
    """Steps per REPLAY segment: ``ceil(sqrt(total))`` by default, at most ``total``."""
    if segment is None:
        return max(1, math.ceil(math.sqrt(total)))
    if not isinstance(segment, int) or isinstance(segment, bool) or segment < 1:
        raise ConfigError(f"segment must be an integer number of steps >= 1 (or None for sqrt(T)), got {segment!r}")
    return min(segment, total)


def output_adjoint(fm: FunctionalModel, task: Task, final: State, batch: dict[str, Tensor], count: int) -> State:
    """``a_T``: ``grad_theta f_j(theta_T)`` per query j of ``batch`` and zeros for the buffers.

    Returns:
        A state whose tensors have a leading query dimension ``count``.
    """
    params = tuple(p.detach().requires_grad_(True) for p in final[0])
    with torch.enable_grad():
        f = task.output(fm.call(params), batch)
        if not isinstance(f, Tensor) or f.shape != (count,):
            raise ShapeError(f"task.output must return one value per query, shape ({count},), got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
        if not torch.isfinite(f).all():
            raise NonFiniteError("the task output of the trained model is NaN or infinite for some queries; check the "
                                 "queries and the recipe (a lower lr if training diverged)")
        rows = [torch.autograd.grad(f[j], params, retain_graph=j < count - 1, allow_unused=True)
                for j in range(count)]
    grads = tuple(torch.stack([r[i] if r[i] is not None else torch.zeros_like(p) for r in rows])
                  for i, p in enumerate(params))  # each (count, *param shape)
    return (grads, *(tuple(torch.zeros_like(g) for g in grads) for _ in final[1:]))


def step_vjp(recipe: Recipe, fm: FunctionalModel, data: TrainData, w: Tensor, plan: Sequence[Tensor], t: int,
             state: State, adjoint: State) -> tuple[State, Tensor]:
    """Pull the adjoints (leading query dimension c) of ``s_{t+1}`` back through step t.

    Returns:
        ``(adjoint of s_t, d f / d w_{B_t})``, the latter of shape (c, |B_t|).
    """
    idx = plan[t].to(fm.device)
    batch = data.batch(idx)

    def one_step(s: State, w_b: Tensor) -> State:
        return recipe.step(fm, s, batch, w_b, t, len(plan))[0]

    _, pullback = torch.func.vjp(one_step, state, w[idx])
    return torch.func.vmap(pullback)(adjoint)


def reverse_pass(recipe: Recipe, fm: FunctionalModel, data: TrainData, w: Tensor, plan: Sequence[Tensor],
                 stored: dict[int, State], k: int, adjoint: State, bar: tqdm | None = None) -> Tensor:
    """Metagradients of one query chunk: segments of ``k`` steps recomputed from ``stored`` (the
    states at multiples of k), then reversed.

    Returns:
        (c, n) tensor, ``d f_j / d w_i``.
    """
    total = len(plan)
    count = adjoint[0][0].shape[0]
    out = torch.zeros(count, data.n, dtype=fm.dtype, device=fm.device)
    for start in reversed(range(0, total, k)):
        stop = min(start + k, total)
        states: list[State] = []
        last = recipe.run(fm, data, w, plan, stored[start], start, stop - 1,
                          on_state=lambda _t, s: states.append(s))
        states.append(last)  # inputs of steps start .. stop-1
        for t in reversed(range(start, stop)):
            adjoint, grad_w = step_vjp(recipe, fm, data, w, plan, t, states.pop(), adjoint)
            out.index_add_(1, plan[t].to(fm.device), grad_w)
            if bar is not None:
                bar.update(1)
    return out


def _forward(recipe: Recipe, fm: FunctionalModel, data: TrainData, w: Tensor, plan: Sequence[Tensor], k: int,
             progress: bool) -> tuple[State, dict[int, State]]:
    """The training run, keeping the input state of every k-th step; returns (final state, kept)."""
    stored: dict[int, State] = {}

    def keep(t: int, s: State) -> None:
        if t % k == 0:
            stored[t] = s

    with tqdm(total=len(plan), desc="magic forward", unit="step", disable=not progress) as bar:
        final = recipe.run(fm, data, w, plan, recipe.init_state(fm.initial), 0, len(plan), on_state=keep, bar=bar)
    return final, stored


def magic_scores(model_fn: Callable[[], nn.Module], train_ds: Any, query_ds: Any, collate: Callable,
                 recipe: Recipe, task: Task | None = None, *, weights: Tensor | None = None,
                 query_batch: int = 16, segment: int | None = None, query_collate: Callable | None = None,
                 progress: bool = False) -> np.ndarray:
    """MAGIC attribution: ``scores[j, i] = d f_j(theta_T) / d w_i`` through ``recipe``'s training run.

    Args:
        model_fn: builds a fresh model; called under ``torch.manual_seed(recipe.seed)``. Its
            parameters' dtype and device are used throughout (floating data is cast to them).
        train_ds: training set (a ``datasets.Dataset`` or a sequence of rows), n rows.
        query_ds: query set, m rows.
        collate: rows -> dict of tensors (see :class:`~tda.scorers.magic.functional.TrainData`).
        recipe: the deterministic training run (:class:`SGDRecipe`, :class:`AdamRecipe`).
        task: measured output f, default :class:`~tda.models.tasks.ClassificationTask` (the margin).
        weights: (n,) data weights at which to differentiate, default ones (the run as trained).
        query_batch: queries reversed together; memory of the reverse pass grows linearly in it.
        segment: REPLAY segment length k (``None``: ceil(sqrt(T))); 1 keeps every state, T
            recomputes the whole run; the result is the same.
        query_collate: collate for the query set, default ``collate``.
        progress: show tqdm bars.

    Returns:
        (m, n) array in the model's dtype; ``> 0``: more weight on training example i raises f_j.

    Cost: one training run forward, then per query chunk one recomputation (none when segment
    is 1) and one reverse run of vmapped step vjps. Memory: ``ceil(T / k) + k`` optimizer states
    plus the chunk's adjoints and one step's graph per query of the chunk.
    """
    if not isinstance(query_batch, int) or isinstance(query_batch, bool) or query_batch < 1:
        raise ConfigError(f"query_batch must be an integer >= 1, got {query_batch!r}")
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe must be an SGDRecipe or AdamRecipe, got {type(recipe).__name__}")
    task = task if task is not None else ClassificationTask()
    fm = build_model(model_fn, recipe.seed)
    data = TrainData(train_ds, collate, fm, "training")
    queries = TrainData(query_ds, query_collate or collate, fm, "query")
    w = check_weights(weights, data.n, fm)
    plan = recipe.plan(data.n)
    k = segment_length(segment, len(plan))
    final, stored = _forward(recipe, fm, data, w, plan, k, progress)
    scores = torch.zeros(queries.n, data.n, dtype=fm.dtype, device=fm.device)
    chunks = list(torch.arange(queries.n).split(query_batch))
    with tqdm(total=len(chunks) * len(plan), desc="magic reverse", unit="step", disable=not progress) as bar:
        for rows in chunks:
            adjoint = output_adjoint(fm, task, final, queries.batch(rows.to(fm.device)), len(rows))
            scores[rows.to(fm.device)] = reverse_pass(recipe, fm, data, w, plan, stored, k, adjoint, bar)
    if not torch.isfinite(scores).all():
        raise NonFiniteError("MAGIC scores contain NaN or infinite values; the training run is numerically unstable: "
                             "lower the recipe's lr or use float64")
    return scores.detach().cpu().numpy()
