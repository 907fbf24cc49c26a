"""Per-layer factored (Kronecker, LoGra-style) gradient projection (METHODS.md section 2).

For a linear layer ``y_t = W a_t + b`` applied at positions t (tokens, or one position for a
plain MLP), the per-example gradient of the output ``f`` is ``G = sum_t delta_t [a_t; 1]^T``
(``d_out x d_in'``, the bias as an extra input column of ones, ``delta_t = df/dy_t``). Its
projection by the Kronecker matrix ``P_out (x) P_in`` is

    phi_L = c_L * P_out^T G P_in = c_L * sum_t (P_out^T delta_t)(P_in^T [a_t; 1])^T   (k_out x k_in)

computed from the projected activations and output gradients, never forming ``G``: cost
``O(T (d_out k_out + d_in k_in) + T k_out k_in)`` per example and layer instead of
``O(d_out d_in k)``. The feature of an example is the concatenation of the flattened ``phi_L``
over the selected layers (row-major ``(k_out, k_in)``, the bias column last on the input side;
transformers' ``Conv1D`` stores its weight as ``(in, out)``, so its ``phi_L`` is the transpose
of its weight-gradient layout).

Matrices: ``P_in`` (``d_in' x k_in``) and ``P_out`` (``d_out x k_out``) are Rademacher or
Gaussian blocks from :class:`tda.projectors.Projector`, seeded by ``(seed, layer name, side)``
and the checkpoint id, so any worker regenerates them. ``k_in`` / ``k_out`` = ``None`` makes
that factor the identity.

Scale: with gains ``g = k`` for a random factor (``E[P P^T] = k I``) and ``g = 1`` for the
identity, ``c_L = sqrt(k / (d g_in g_out))`` where ``k`` is the total feature dimension and
``d`` the number of gradient entries covered. Then ``E <phi, phi'> = (k/d) <g, g'>``, exactly
the expectation of the dense projector's ``P^T g / sqrt(d)``, so TRAK's relative ridge and
TracIn scales mean the same thing for both; with both factors the identity ``c_L = 1`` and the
features *are* the per-example gradients.

Activations and output gradients are captured with forward hooks and one batched backward pass
of ``sum_b f_b`` (examples must not interact, as for the vmap path: the model runs in eval
mode), so ``df/dy`` of example b is exactly ``delta`` of example b.
"""

from __future__ import annotations

import logging
import math
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, ShapeError
from .featurize import StateDict, featurize_loop
from .gradients import check_finite, eval_mode, loss_weights
from .projectors import Projector
from .tasks import Batch, Task

logger = logging.getLogger(__name__)

_KINDS = ("rademacher", "gaussian")
_SIDES = {"in": 0, "out": 1}


@dataclass(frozen=True)
class LayerSpec:
    """One projected layer. ``d_in`` counts the bias column; ``layout`` is ``"linear"`` (weight
    ``(out, in)``) or ``"conv1d"`` (transformers' ``Conv1D``, weight ``(in, out)``)."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    layout: str

    @property
    def params(self) -> list[str]:
        """Names of the parameters this layer's feature covers."""
        return [f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.bias else [])


def _layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d"
    return None


def _spec(name: str, module: nn.Module, layout: str) -> LayerSpec:
    w = module.weight
    d_out, d_in = (w.shape[0], w.shape[1]) if layout == "linear" else (w.shape[1], w.shape[0])
    bias = getattr(module, "bias", None) is not None
    return LayerSpec(name, int(d_in) + int(bias), int(d_out), bias, layout)


def factored_layers(model: nn.Module, names: Sequence[str] | None = None) -> list[LayerSpec]:
    """The linear layers to project, in module order.

    Args:
        model: the network.
        names: module names or prefixes (``"transformer.h.0"`` selects every linear layer in
            block 0). ``None``: every ``nn.Linear`` / ``Conv1D`` whose weight requires grad and
            is not shared with another module (a tied LM head is skipped: its weight's gradient
            also has the embedding's part, which no factored feature covers).

    Raises:
        ConfigError: a name matches no linear layer, or nothing is selected.
    """
    candidates = [(n, m, _layout(m)) for n, m in model.named_modules() if _layout(m)]
    if names is None:
        owners: dict[int, int] = {}
        for _, mod in model.named_modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        chosen = [(n, m, lay) for n, m, lay in candidates
                  if m.weight.requires_grad and owners[id(m.weight)] == 1]
        skipped = [n for n, m, _ in candidates if owners[id(m.weight)] > 1]
        if skipped:
            logger.info("factored projection skips layers with shared weights: %s", skipped)
    else:
        chosen = []
        for wanted in names:
            hits = [c for c in candidates if c[0] == wanted or c[0].startswith(wanted + ".")]
            if not hits:
                raise ConfigError(f"{wanted!r} names no linear layer; choose from "
                                  f"{[c[0] for c in candidates][:20]}")
            chosen.extend(h for h in hits if h[0] not in {c[0] for c in chosen})
        order = {n: i for i, (n, _, _) in enumerate(candidates)}
        chosen.sort(key=lambda c: order[c[0]])
    if not chosen:
        raise ConfigError("the model has no (unshared) nn.Linear or Conv1D layer to project; "
                          "use the dense projection")
    return [_spec(n, m, lay) for n, m, lay in chosen]


@dataclass(frozen=True)
class FactoredSpec:
    """Everything that determines the factored features; stored in manifests and compared."""

    projection: str
    layers: tuple[str, ...]
    k_in: int | None
    k_out: int | None
    seed: int
    kind: str
    k: int
    dim: int


class FactoredProjector:
    """Kronecker projection of per-layer gradients from captured activations and output grads.

    Args:
        layers: the layers (see :func:`factored_layers`).
        k_in, k_out: projected input / output dimension per layer, ``None`` for the identity.
        seed: base seed. kind: ``"rademacher"`` or ``"gaussian"``.
    """

    def __init__(self, layers: Sequence[LayerSpec], k_in: int | None = 16, k_out: int | None = 16,
                 seed: int = 0, kind: str = "rademacher") -> None:
        if kind not in _KINDS:
            raise ConfigError(f"projector kind {kind!r} is unknown; use one of {_KINDS}")
        for label, value in (("k_in", k_in), ("k_out", k_out)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"factored {label} must be >= 1 or None (identity), got {value}")
        if seed < 0:
            raise ConfigError(f"projection seed must be >= 0, got {seed}")
        if not layers:
            raise ConfigError("factored projection needs at least one layer")
        self.layers, self.k_in, self.k_out, self.seed, self.kind = list(layers), k_in, k_out, seed, kind
        self.sizes = [(k_out or s.d_out) * (k_in or s.d_in) for s in self.layers]  # k_L
        self.k = sum(self.sizes)
        self.dim = sum(s.d_in * s.d_out for s in self.layers)
        gain = float((k_in or 1) * (k_out or 1))
        self.scale = math.sqrt(self.k / (self.dim * gain))  # c_L, the same for every layer
        self._cache: dict[tuple, Tensor] = {}

    @property
    def spec(self) -> FactoredSpec:
        return FactoredSpec("factored", tuple(s.name for s in self.layers), self.k_in, self.k_out,
                            self.seed, self.kind, self.k, self.dim)

    def spec_dict(self) -> dict[str, Any]:
        d = asdict(self.spec)
        d["layers"] = list(d["layers"])
        return d

    def layer_seed(self, layer: LayerSpec, side: str) -> int:
        """Seed of one factor: a pure function of (seed, layer name, side)."""
        seq = np.random.SeedSequence([self.seed, zlib.crc32(layer.name.encode()), _SIDES[side]])
        return int(seq.generate_state(1, dtype=np.uint32)[0])

    def factor(self, checkpoint: int, layer: LayerSpec, side: str) -> Tensor | None:
        """``P_in`` (d_in x k_in) or ``P_out`` (d_out x k_out), fp32 CPU; ``None`` = identity."""
        k = self.k_in if side == "in" else self.k_out
        if k is None:
            return None
        d = layer.d_in if side == "in" else layer.d_out
        return Projector(d, k, self.layer_seed(layer, side), self.kind, block_rows=d).matrix(checkpoint)

    def _factor_on(self, checkpoint: int, layer: LayerSpec, side: str, like: Tensor) -> Tensor | None:
        key = (checkpoint, layer.name, side, str(like.device), like.dtype)
        if key not in self._cache:
            mat = self.factor(checkpoint, layer, side)
            self._cache[key] = None if mat is None else mat.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def clear_cache(self) -> None:
        """Drop cached factors (e.g. after the last batch of a checkpoint)."""
        self._cache.clear()

    def project(self, captures: Sequence[tuple[Tensor, Tensor]], checkpoint: int) -> Tensor:
        """Features from per-layer captures.

        Args:
            captures: per layer (in :attr:`layers` order) ``(a, delta)``: inputs with the bias
                column, (B, N, d_in), and output gradients (B, N, d_out), N positions.
            checkpoint: checkpoint id selecting the matrices.

        Returns:
            (B, k) features, fp32 (fp64 for fp64 inputs).
        """
        if len(captures) != len(self.layers):
            raise ShapeError(f"{len(captures)} captures for {len(self.layers)} layers")
        parts = []
        for layer, (a, delta) in zip(self.layers, captures):
            if a.shape[-1] != layer.d_in or delta.shape[-1] != layer.d_out:
                raise ShapeError(f"layer {layer.name}: captured widths {a.shape[-1]}, {delta.shape[-1]} "
                                 f"but the projector expects {layer.d_in}, {layer.d_out}")
            dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
            a, delta = a.to(dtype), delta.to(dtype)
            p_in = self._factor_on(checkpoint, layer, "in", a)
            p_out = self._factor_on(checkpoint, layer, "out", a)
            pa = a if p_in is None else a @ p_in  # (B, N, k_in)
            pd = delta if p_out is None else delta @ p_out  # (B, N, k_out)
            phi = pd.transpose(1, 2) @ pa  # (B, k_out, k_in) = sum_n pd_n pa_n^T
            parts.append(phi.reshape(phi.shape[0], -1))
        out = torch.cat(parts, dim=1)
        return out if self.scale == 1.0 else out * self.scale


@contextmanager
def _grad_enabled_on(params: Iterable[nn.Parameter]) -> Iterator[None]:
    params = list(params)
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, old):
            p.requires_grad_(flag)


def capture_linear(model: nn.Module, task: Task, batch: Batch,
                   layers: Sequence[LayerSpec]) -> list[tuple[Tensor, Tensor]]:
    """Per-example inputs (with a ones column for the bias) and output gradients of each layer.

    Runs ``task.output`` on the whole batch in eval mode with forward hooks, then one backward
    pass of ``sum_b f_b`` to the layer outputs. A layer called several times contributes all
    its calls as extra positions (the weight gradient is their sum).

    Returns:
        Per layer ``(a (B, N, d_in), delta (B, N, d_out))``, detached.
    """
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {s.name: [] for s in layers}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen[name].append((args[0], output))
        return fn

    handles = [modules[s.name].register_forward_hook(hook(s.name)) for s in layers]
    weights = [modules[s.name].weight for s in layers]
    try:
        with eval_mode(model), torch.enable_grad(), _grad_enabled_on(weights):
            f = task.output(model, batch)  # (B,)
            if f.ndim != 1:
                raise ShapeError(f"task output must be (B,), got {tuple(f.shape)}")
            b = f.shape[0]
            outs = [o for s in layers for _, o in seen[s.name]]
            grads = iter(torch.autograd.grad(f.sum(), outs, allow_unused=True) if outs else [])
    finally:
        for h in handles:
            h.remove()
    captures = []
    for s in layers:
        a_parts, d_parts = [], []
        for inp, out in seen[s.name]:
            g = next(grads)
            if inp.shape[0] != b:
                raise ShapeError(f"layer {s.name} sees inputs of shape {tuple(inp.shape)}: the leading "
                                 f"dimension must be the batch ({b}); use the dense projection")
            a = inp.detach().reshape(b, -1, inp.shape[-1])  # (B, n, d_in - bias)
            if s.bias:
                a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
            a_parts.append(a)
            d_parts.append((torch.zeros_like(out) if g is None else g).detach().reshape(b, -1, s.d_out))
        if not a_parts:  # never called: zero gradient
            a_parts = [torch.zeros(b, 0, s.d_in, dtype=f.dtype, device=f.device)]
            d_parts = [torch.zeros(b, 0, s.d_out, dtype=f.dtype, device=f.device)]
        captures.append((torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)))
    return captures


class FactoredFeaturizer:
    """Factored-projection features with the interface of :class:`tda.featurize.Featurizer`.

    Args:
        model: the network. task: output function.
        k_in, k_out: per-layer projected dimensions (``None``: identity factor); the feature
            dimension is ``self.k = sum over layers of k_out * k_in``.
        seed, kind: projection seed and ``"rademacher"`` / ``"gaussian"``.
        layers: module names or prefixes (see :func:`factored_layers`), ``None`` for all.
        device: where to compute (default: the model's). chunk_size: examples per forward pass.
    """

    def __init__(self, model: nn.Module, task: Task, k_in: int | None = 16, k_out: int | None = 16,
                 seed: int = 0, kind: str = "rademacher", layers: Sequence[str] | None = None,
                 device: str | torch.device | None = None, chunk_size: int | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.task = task
        self.layers = factored_layers(model, layers)
        self.projector = FactoredProjector(self.layers, k_in, k_out, seed, kind)
        self.names = [p for s in self.layers for p in s.params]
        self.chunk_size = chunk_size

    @property
    def k(self) -> int:
        """Feature dimension ``sum over layers of k_out * k_in``."""
        return self.projector.k

    @property
    def feature_dim(self) -> int:
        """Width of a stored feature row (the pipeline sizes stores with it); equals :attr:`k`."""
        return self.projector.k

    def spec(self) -> dict[str, Any]:
        """What determines the features (recorded in manifests and compared on reuse)."""
        return {"task": self.task.name, "params": list(self.names), **self.projector.spec_dict()}

    def featurize_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, k) float32 and Q (B,) float32 for one batch under the loaded weights."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        n = next(iter(batch.values())).shape[0]
        step = self.chunk_size or n
        parts = []
        for lo in range(0, n, step):
            chunk = {k: v[lo: lo + step] for k, v in batch.items()}
            parts.append(self.projector.project(capture_linear(self.model, self.task, chunk, self.layers), checkpoint))
        phi = torch.cat(parts)
        check_finite(phi, ids, "factored gradient features")
        q = loss_weights(self.model, self.task, batch)
        check_finite(q, ids, "loss weights Q")
        return phi.float().cpu().numpy(), q.cpu().numpy()

    def featurize(self, state: StateDict | str | Path, checkpoint: int,
                  batches: Iterable[tuple[np.ndarray, Batch]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids, features (B, k), Q (B,))`` per batch under checkpoint ``checkpoint``."""
        yield from featurize_loop(self.model, self.device, self.featurize_batch, state, checkpoint, batches,
                                  self.projector.clear_cache)


__all__ = ["FactoredFeaturizer", "FactoredProjector", "FactoredSpec", "LayerSpec", "capture_linear",
           "factored_layers"]
