"""DDPM output functions, draws and featurizer (docs/methods.md sections 1 and 4).

DDPM with epsilon prediction (Ho et al. 2020): a linear beta schedule ``beta_1..beta_T``,
``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, noisy input ``x_t = sqrt(alpha_bar_t) x +
sqrt(1 - alpha_bar_t) eps`` and the training loss ``L_simple = mean((eps_theta(x_t, t) - eps)^2)``
(mean over pixels). Timesteps are 0-based: ``t`` in ``[0, T)``.

Output functions of :class:`DiffusionTask` (what is attributed, selectable as in D-TRAK), each
per example at one ``(t, eps)`` draw, ``e = eps_theta(x_t, t)`` flattened to D values:

- ``loss``: ``mean((e - eps)^2)`` (``L_simple``, the training loss),
- ``square``: ``mean(e^2)``, ``avg``: ``mean(e)`` (docs/methods.md: means, not sums),
- ``l1``: ``||e||_1``, ``l2``: ``||e||_2`` (D-TRAK's norms).

Sign (docs/methods.md: ``tau(z)_i > 0`` means training on i raises ``f(z)``): the score is the effect
on the selected output. For ``loss`` a positive score means training on i *raises* the query's
loss (it makes the image less likely); helpful examples have negative scores. TRAK's train-side
weight must then be ``Q = -dLoss/df`` (as for classification, where ``Q = 1 - p_y`` is minus
the derivative of the cross-entropy in the margin): ``Q = -1`` for ``loss``. For ``square``,
``avg``, ``l1`` and ``l2`` no such relation exists, ``Q = 1`` ("1 when undefined"), and the sign
is D-TRAK's heuristic one.

Randomness is never stored but always reproducible: training records, per step and example,
``(example id, timestep, noise seed)`` (:class:`TrainLog`) so Diffusion-TracIn replays it; the
attribution grid (:class:`GridDraws`) is ``K`` stratified timesteps with an offset seeded by
``seed`` alone (shared by train and query side) and noise seeded by ``(seed, side, id, slot)``.
Noise for a seed is ``torch.randn`` from a ``torch.Generator`` seeded with it
(:func:`noise_from_seeds`).

What remains here: the schedule and noise (:class:`NoiseSchedule`, :func:`noisy`), the outputs
(:class:`DiffusionTask`), the draws and :class:`TrainLog`, :class:`NoisedInputs` and the featurizer.
The demo UNet, its training recipe and sampler belong to the diffusion family (``pipelines/families/unet.py``).

:class:`DiffusionFeaturizer` turns a batch into ``S`` draws per example and either averages the
``S`` gradients before projecting (D-TRAK, "may be done before projection since projection is
linear") or keeps every draw as a slot ``[P^T g_s / sqrt(d), ||g_s||_2]`` (width ``k + 1``), the
exact full-gradient norm being what Diffusion-ReTrac divides by. With ``projection="factored"``
(or ``"tensorsketch"``, :mod:`tda.projections.tensorsketch`) the dense ``P^T g / sqrt(d)`` is replaced by the
per-layer Kronecker projection (or TensorSketch) of :mod:`tda.featurizers.factored` over the UNet's convolutions and linear layers (GroupNorm parameters are not
covered), the norm by the exact norm of the covered gradient; averaging over draws after
projecting equals projecting the average, as for the dense projection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.errors import ConfigError, DataError, ShapeError
from tda.featurizers.gradient import StateDict, featurize_loop
from tda.featurizers.spec import make_featurizer, projection_spec
from tda.gradients.per_example import check_finite, flatten_grads, per_example_grads
from tda.models.tasks import Batch, ModelCall, Task

OUTPUTS = ("loss", "square", "avg", "l1", "l2")
_SEED_MAX = 1 << 62


# ------------------------------------------------------------------ schedule and noise
@dataclass(frozen=True)
class NoiseSchedule:
    """Linear beta schedule ``beta_t = linspace(beta_start, beta_end, T)[t]``, t in [0, T)."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ConfigError(f"diffusion needs T >= 1 timesteps, got {self.T}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(
                f"betas must satisfy 0 < beta_start <= beta_end < 1, got {self.beta_start}, "
                f"{self.beta_end} (DDPM: 1e-4 and 0.02 for T=1000)"
            )

    @property
    def betas(self) -> Tensor:
        """(T,) float64."""
        return torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)

    @property
    def alpha_bar(self) -> Tensor:
        """(T,) float64 ``prod_{s<=t} (1 - beta_s)``."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def spec(self) -> dict[str, Any]:
        return asdict(self)


def seed_from(*entropy: int) -> int:
    """A 62-bit seed, a pure function of the integers given (via ``numpy.random.SeedSequence``)."""
    lo, hi = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2)
    return int((int(hi) << 32 | int(lo)) % _SEED_MAX)


def noise_from_seeds(seeds: Sequence[int] | np.ndarray, shape: Sequence[int]) -> Tensor:
    """Standard normal noise, one ``shape`` tensor per seed: (len(seeds), *shape) float32."""
    gen = torch.Generator()
    out = torch.empty(len(seeds), *shape)
    for j, s in enumerate(np.asarray(seeds, dtype=np.int64).tolist()):
        gen.manual_seed(s)
        out[j] = torch.randn(*shape, generator=gen)
    return out


def noisy(x: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """``x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps``. Shapes: (B, C, H, W), (B,), (B, C, H, W)."""
    ab = alpha_bar.to(dtype=x.dtype, device=x.device)[t.long()].reshape(-1, *([1] * (x.ndim - 1)))
    return ab.sqrt() * x + (1.0 - ab).sqrt() * noise


# ------------------------------------------------------------------ output functions
def diffusion_output(eps_pred: Tensor, noise: Tensor, output: str) -> Tensor:
    """The selected output per example from (B, ...) predictions and noise: (B,)."""
    e = eps_pred.reshape(eps_pred.shape[0], -1)  # (B, D)
    if output == "loss":
        return (e - noise.reshape(e.shape)).pow(2).mean(dim=1)
    if output == "square":
        return e.pow(2).mean(dim=1)
    if output == "avg":
        return e.mean(dim=1)
    if output == "l1":
        return e.abs().sum(dim=1)
    if output == "l2":
        return e.pow(2).sum(dim=1).sqrt()
    raise ConfigError(f"diffusion output {output!r} is unknown; use one of {OUTPUTS}")


class DiffusionTask(Task):
    """Output ``f`` of an epsilon-prediction model at given ``(t, eps)`` draws.

    The batch holds ``x`` (B, C, H, W) clean images in [-1, 1], ``t`` (B,) int64 timesteps and
    ``noise`` (B, C, H, W); the model is called as ``model(x_t, t)``.

    Args:
        schedule: the noise schedule the model was trained with.
        output: one of :data:`OUTPUTS` (see the module docstring for definitions and signs).
    """

    kind = "diffusion"

    def __init__(self, schedule: NoiseSchedule, output: str = "loss") -> None:
        if output not in OUTPUTS:
            raise ConfigError(f"diffusion output {output!r} is unknown; use one of {OUTPUTS}")
        self.schedule = schedule
        self.output_name = output
        self.name = f"diffusion-{output}"
        self._alpha_bar = schedule.alpha_bar.float()

    def output(self, model: ModelCall, batch: Batch) -> Tensor:
        for key in ("x", "t", "noise"):
            if key not in batch:
                raise ShapeError(f"diffusion batch has no {key!r} entry (has {sorted(batch)}); "
                                 "draws (t, noise) are added by DiffusionFeaturizer")
        x, t, noise = batch["x"], batch["t"], batch["noise"]
        eps_pred = model(noisy(x, t, noise, self._alpha_bar), t)
        return diffusion_output(eps_pred, noise, self.output_name)

    @property
    def q_value(self) -> float:
        """``Q = -dLoss/df``: -1 for ``loss``, else 1 (undefined)."""
        return -1.0 if self.output_name == "loss" else 1.0

    def loss_weight(self, model: ModelCall, batch: Batch) -> Tensor:
        first = next(iter(batch.values()))
        return torch.full((first.shape[0],), self.q_value, dtype=torch.float32, device=first.device)


# ------------------------------------------------------------------ draws (t, noise seed)
class Draws:
    """Per-example ``(t, noise seed)`` draws: ``__call__(checkpoint, ids) -> (t, seeds)``, both
    (B, slots) int64. Subclasses are pure functions of their arguments."""

    slots: int = 1

    def __call__(self, checkpoint: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        return {"kind": type(self).__name__}


class GridDraws(Draws):
    """``K`` stratified timesteps ``t_j = floor((j + u) T / K)`` (u seeded by ``seed``, shared by
    every example and side) times ``R`` noise draws seeded by ``(seed, side, id, j, r)``.
    Slot order: timestep-major (slot ``j * R + r``)."""

    def __init__(self, T: int, timesteps: int, noise_draws: int = 1, seed: int = 0, side: int = 0) -> None:
        if not 1 <= timesteps <= T or noise_draws < 1:
            raise ConfigError(f"need 1 <= timesteps <= T={T} and noise_draws >= 1, got {timesteps}, {noise_draws}")
        self.T, self.K, self.R, self.seed, self.side = T, timesteps, noise_draws, seed, side
        u = np.random.default_rng(np.random.SeedSequence([seed, 0x71D])).random()
        self.grid = np.minimum(np.floor((np.arange(timesteps) + u) * T / timesteps), T - 1).astype(np.int64)
        self.slots = timesteps * noise_draws

    def __call__(self, checkpoint: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        t = np.broadcast_to(np.repeat(self.grid, self.R), (len(ids), self.slots)).copy()
        seeds = np.array([[seed_from(self.seed, self.side, i, j, r) for j in range(self.K) for r in range(self.R)]
                          for i in ids.tolist()], dtype=np.int64).reshape(len(ids), self.slots)
        return t, seeds

    def spec(self) -> dict[str, Any]:
        return {"kind": "grid", "T": self.T, "timesteps": self.K, "noise_draws": self.R,
                "seed": self.seed, "side": self.side, "grid": self.grid.tolist()}


class SeededDraws(Draws):
    """One draw per example, ``t`` uniform in [0, T) and the noise seed, both from
    ``(seed, side, id)``: the "seeded schedule" when training draws were not recorded."""

    def __init__(self, T: int, seed: int = 0, side: int = 0) -> None:
        self.T, self.seed, self.side = T, seed, side

    def __call__(self, checkpoint: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seeds = np.array([seed_from(self.seed, self.side, i) for i in np.asarray(ids).tolist()], dtype=np.int64)
        return (seeds % self.T)[:, None], np.array([seed_from(s, 1) for s in seeds.tolist()], np.int64)[:, None]

    def spec(self) -> dict[str, Any]:
        return {"kind": "seeded", "T": self.T, "seed": self.seed, "side": self.side}


@dataclass
class TrainLog:
    """What DDPM training drew, one row per (step, example): all (N,) int64."""

    step: np.ndarray
    epoch: np.ndarray
    example_id: np.ndarray
    timestep: np.ndarray
    noise_seed: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.int64) for k, v in asdict(self).items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "TrainLog":
        missing = {"step", "epoch", "example_id", "timestep", "noise_seed"} - set(arrays)
        if missing:
            raise DataError(f"training log is missing {sorted(missing)}; retrain to record it")
        return cls(**{k: np.asarray(arrays[k], dtype=np.int64) for k in
                      ("step", "epoch", "example_id", "timestep", "noise_seed")})


class RecordedDraws(Draws):
    """Replays the training draws: for checkpoint c, the ``(t, noise seed)`` each example was
    trained with in the epoch ``epochs[c]`` that ended at that checkpoint.

    Args:
        logs: checkpoint id -> the training log of the run that produced it.
        epochs: checkpoint id -> epoch (0-based) after which it was saved.
    """

    def __init__(self, logs: Mapping[int, TrainLog], epochs: Mapping[int, int]) -> None:
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for c, log in logs.items():
            rows = log.epoch == epochs[c]
            order = np.argsort(log.example_id[rows], kind="stable")
            self._tables[c] = (log.example_id[rows][order], log.timestep[rows][order], log.noise_seed[rows][order])
        self.epochs = dict(epochs)

    def __call__(self, checkpoint: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if checkpoint not in self._tables:
            raise DataError(f"no training log for checkpoint {checkpoint}; retrain to record one")
        known, t, seeds = self._tables[checkpoint]
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(known, ids), 0, max(len(known) - 1, 0))
        missing = ids[(len(known) == 0) | (known[pos] != ids)] if len(known) else ids
        if len(missing):
            raise DataError(f"examples {missing[:5].tolist()} were not trained in epoch "
                            f"{self.epochs[checkpoint]} (checkpoint {checkpoint}); featurize training examples only")
        return t[pos][:, None], seeds[pos][:, None]

    def spec(self) -> dict[str, Any]:
        return {"kind": "recorded", "epochs": {str(c): e for c, e in sorted(self.epochs.items())}}


class NoisedInputs:
    """Model inputs ``(x_t, t)`` of a batch at each of its draws, for representations of a
    diffusion model (:class:`tda.featurizers.representations.RepresentationFeaturizer` ``inputs``): the
    representation of an image is averaged over its draws (e.g. a :class:`GridDraws` grid).

    Args:
        schedule: the model's noise schedule. draws: ``(t, noise seed)`` per example and slot,
            asked for checkpoint 0 (grid and seeded draws do not depend on the checkpoint).
    """

    def __init__(self, schedule: NoiseSchedule, draws: Draws) -> None:
        self.schedule, self.draws = schedule, draws
        self._alpha_bar = schedule.alpha_bar.float()

    def __call__(self, batch: Batch, ids: np.ndarray) -> list[tuple[tuple[Tensor, Tensor], None]]:
        """``[((x_t, t), None)]`` per slot, with x_t (B, C, H, W) and t (B,) int64."""
        x = batch["x"]  # (B, C, H, W)
        t, seeds = self.draws(0, np.asarray(ids))  # (B, S) each
        views = []
        for s in range(t.shape[1]):
            ts = torch.from_numpy(t[:, s]).to(x.device)
            noise = noise_from_seeds(seeds[:, s], x.shape[1:]).to(x.device)
            views.append(((noisy(x, ts, noise, self._alpha_bar), ts), None))
        return views

    def spec(self) -> dict[str, Any]:
        return {"kind": "noised", "draws": self.draws.spec(), "schedule": self.schedule.spec()}


# ------------------------------------------------------------------ featurizer
class DiffusionFeaturizer:
    """Projected per-example gradients of a :class:`DiffusionTask` over ``S`` draws per example.

    ``mode="mean"``: the gradient averaged over the draws, projected: (B, k) (D-TRAK features).
    ``mode="slots"``: every draw kept: (B, S*(k+1)), slot s = ``[P^T g_s / sqrt(d), ||g_s||_2]``
    (Diffusion-TracIn / ReTrac features). ``mode="pooled"``: one slot of the draws' mean gradient
    ``g = mean_s g_s``, ``[P^T g / sqrt(d), ||g||_2]``: (B, k+1), the training side of TracIn /
    ReTrac with ``train_draws: grid``. Same interface as :class:`tda.featurizers.gradient.Featurizer`.

    Args:
        model, task: the epsilon model and the output function.
        draws: where each example's ``(t, noise seed)`` come from.
        mode: ``"mean"``, ``"slots"`` or ``"pooled"``.
        projection: ``"dense"`` or ``"sparse"`` (:class:`Featurizer`, dimension ``k``),
            ``"factored"`` (:class:`tda.featurizers.factored.FactoredFeaturizer` with ``k_in`` / ``k_out``,
            ``param_names`` then naming modules; ``k`` and ``backend`` unused) or
            ``"tensorsketch"`` (the same featurizer's TensorSketch into ``k``, ``param_names``
            naming modules).
        chunk_size: examples (times draws) per vmap chunk or, factored, per forward pass.
        Other arguments as for :class:`Featurizer`.
    """

    def __init__(self, model: nn.Module, task: DiffusionTask, draws: Draws, mode: str = "mean", k: int = 1024,
                 seed: int = 0, kind: str = "rademacher", param_names: Sequence[str] | None = None,
                 device: str | torch.device | None = None, backend: str = "auto",
                 chunk_size: int | None = None, projection: str = "dense", k_in: int | None = 16,
                 k_out: int | None = 16, nonzeros: int = 1) -> None:
        if mode not in ("mean", "slots", "pooled"):
            raise ConfigError(f"diffusion featurizer mode {mode!r} is unknown; use 'mean', 'slots' or 'pooled'")
        spec = projection_spec(projection, k=k, seed=seed, kind=kind, backend=backend, k_in=k_in, k_out=k_out,
                               nonzeros=nonzeros)
        self.inner: Any = make_featurizer(spec, model, task, param_names=param_names, device=device,
                                          chunk_size=chunk_size)
        self.task, self.draws, self.mode, self.projection = task, draws, mode, projection
        self.projector = self.inner.projector

    @property
    def feature_dim(self) -> int:
        """Width of one example's features."""
        k = self.projector.k
        return {"mean": k, "pooled": k + 1}.get(self.mode, self.draws.slots * (k + 1))

    def spec(self) -> dict[str, Any]:
        return {**self.inner.spec(), "mode": self.mode, "draws": self.draws.spec(),
                "schedule": self.task.schedule.spec(), "feature_dim": self.feature_dim}

    def featurize_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, feature_dim) float32 and Q (B,) float32 under the loaded weights."""
        x = batch["x"].to(self.inner.device)  # (B, C, H, W)
        t, seeds = self.draws(checkpoint, np.asarray(ids))  # (B, S) each
        b, s = t.shape
        big = {"x": x.repeat_interleave(s, dim=0),  # (B*S, C, H, W), example-major
               "t": torch.from_numpy(t.reshape(-1)).to(x.device),
               "noise": noise_from_seeds(seeds.reshape(-1), x.shape[1:]).to(x.device)}
        captured = self.projection in ("factored", "tensorsketch")
        phi = (self._factored if captured else self._dense)(big, ids, checkpoint, s)
        phi = phi.reshape(b, -1)  # (B, feature_dim)
        check_finite(phi, ids, "projected gradients")
        q = np.full(b, self.task.q_value if self.mode == "mean" else 1.0, dtype=np.float32)
        return phi.float().cpu().numpy(), q

    def _dense(self, big: Batch, ids: Sequence[int], checkpoint: int, s: int) -> Tensor:
        """Dense features of the (B*S) draw rows: (B, k) mean, (B, k+1) pooled or (B*S, k+1) slots."""
        grads = per_example_grads(self.inner.model, self.task, big, self.inner.names, self.inner.chunk_size)
        flat = flatten_grads(grads, self.inner.names)  # (B*S, d)
        check_finite(flat, np.repeat(np.asarray(ids), s), "per-draw gradients")
        if self.mode != "slots":
            flat = flat.reshape(-1, s, flat.shape[1]).mean(dim=1)  # (B, d): the draws' mean gradient
        phi = self.projector.project(flat, checkpoint)
        if self.mode == "mean":
            return phi
        return torch.cat([phi, flat.double().norm(dim=1).to(phi.dtype)[:, None]], dim=1)  # [phi, ||g||]

    def _factored(self, big: Batch, ids: Sequence[int], checkpoint: int, s: int) -> Tensor:
        """Factored features of the (B*S) draw rows, shaped as :meth:`_dense`'s; chunks hold whole examples."""
        rows = []
        for caps in self.inner.captures(big, multiple=s):
            phi = self.projector.project(caps, checkpoint)  # (rows, k)
            if self.mode != "slots":
                phi = phi.reshape(-1, s, phi.shape[1]).mean(dim=1)  # projection is linear: mean of projections
            if self.mode != "mean":  # exact norm of each draw's (slots) or of the draws' mean (pooled) gradient
                norms = self.projector.grad_norms(caps, group=1 if self.mode == "slots" else s)
                phi = torch.cat([phi, norms[:, None]], dim=1)
            rows.append(phi)
        return torch.cat(rows)

    def featurize(self, state: StateDict | str, checkpoint: int,
                  batches: Iterable[tuple[np.ndarray, Batch]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids, features (B, feature_dim), Q (B,))`` per batch under ``checkpoint``."""
        yield from featurize_loop(self.inner.model, self.inner.device, self.featurize_batch, state, checkpoint, batches,
                                  self.projector.clear_cache)
