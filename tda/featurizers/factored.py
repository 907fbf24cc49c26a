"""Per-layer factored (Kronecker, LoGra-style) gradient projection (docs/methods.md section 2).

For a linear layer ``y_t = W a_t + b`` applied at positions t (tokens, or one position for a
plain MLP), the per-example gradient of the output ``f`` is ``G = sum_t delta_t [a_t; 1]^T``
(``d_out x d_in'``, the bias as an extra input column of ones, ``delta_t = df/dy_t``; a 2-d
convolution is the same with ``a_t`` its input patches, see :mod:`tda.gradients.captures`). Its
projection by the Kronecker matrix ``P_out (x) P_in`` is

    phi_L = c_L * P_out^T G P_in = c_L * sum_t (P_out^T delta_t)(P_in^T [a_t; 1])^T   (k_out x k_in)

computed from the projected activations and output gradients, never forming ``G``: cost
``O(T (d_out k_out + d_in k_in) + T k_out k_in)`` per example and layer instead of
``O(d_out d_in k)``. The feature of an example is the concatenation of the flattened ``phi_L``
over the selected layers (row-major ``(k_out, k_in)``, the bias column last on the input side;
transformers' ``Conv1D`` stores its weight as ``(in, out)``, so its ``phi_L`` is the transpose
of its weight-gradient layout). :class:`FactoredFeaturizer` also drives the TensorSketch of the
same captures (``projection="tensorsketch"``, :mod:`tda.projections.tensorsketch`).

Coverage: supported layers are ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d`` with
``groups=1``. Any other trainable parameter under the selection (norm scales and shifts,
embeddings, grouped or 1-d/3-d convolutions, weights shared between modules such as a tied LM
head) is not covered: it is skipped with a logged note and listed as ``skipped`` in
:meth:`FactoredFeaturizer.spec` (and so in every store's manifest). Naming such a module
explicitly is a :class:`ConfigError`. A layer whose output is modified in place (e.g.
``ReLU(inplace=True)`` right after it) is refused, since its captured output gradient would be
the gradient of the modified tensor.

Matrices: ``P_in`` (``d_in' x k_in``) and ``P_out`` (``d_out x k_out``) are Rademacher or
Gaussian blocks from :class:`tda.projections.projectors.Projector`, seeded by ``(seed, layer name, side)``
and the checkpoint id, so any worker regenerates them. ``k_in`` / ``k_out`` = ``None`` makes
that factor the identity, and so does a ``k`` at least the layer's dimension on that side (a
random map to as many or more dimensions only adds noise and width; the identity is exact).

Scale: with gains ``g = k`` for a random factor (``E[P P^T] = k I``) and ``g = 1`` for the
identity, ``c_L = sqrt(k / (d g_in,L g_out,L))`` where ``k`` is the total feature dimension and
``d`` the number of gradient entries covered. Then ``E <phi, phi'> = (k/d) <g, g'>``, exactly
the expectation of the dense projector's ``P^T g / sqrt(d)``, so TRAK's relative ridge and
TracIn scales mean the same thing for both; with both factors the identity ``c_L = 1`` and the
features *are* the per-example gradients. At equal total k the Kronecker features are noisier
than dense ones: the error of an inner product shrinks with ``k_in`` and ``k_out`` separately,
not with their product.

Activations and output gradients are captured by :func:`tda.gradients.captures.capture_layers` (forward
hooks, one batched backward pass in eval mode).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.gradients.captures import (SIDES, SUPPORTED, CapturedLayers, Captures, LayerSpec, _grad_enabled_on, capture_layers,
                       layer_matrices, under)
from tda.gradients.captures import matrix_layout as _layout, matrix_spec as _spec
from tda.errors import ConfigError, ShapeError
from tda.featurizers.gradient import StateDict, featurize_loop
from tda.gradients.per_example import check_finite, loop_per_example_grads, loss_weights
from tda.projections.projectors import Projector
from tda.projections.sketch_layers import tensorsketch_selection
from tda.models.tasks import Batch, Task
from tda.projections.tensorsketch import TensorSketchProjector

logger = logging.getLogger(__name__)

_KINDS = ("rademacher", "gaussian")


def _why_not(module: nn.Module, shared: bool) -> str:
    """Why a module with parameters is not covered by the factored projection."""
    if _layout(module) and shared:
        return "a layer whose weight is shared with another module (e.g. a tied LM head)"
    if _layout(module):
        return "a layer whose weight does not require grad"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"a grouped convolution (groups={module.groups}): its weight gradient is block-diagonal over "
                "the groups, which one Kronecker factor pair does not represent")
    return f"a {type(module).__name__}, not one of the supported layers ({SUPPORTED})"


def factored_selection(model: nn.Module, names: Sequence[str] | None = None) -> tuple[list[LayerSpec], list[str]]:
    """The layers to project, in module order, and the trainable parameters left uncovered.

    Args:
        model: the network.
        names: module names or prefixes (``"transformer.h.0"`` selects every supported layer in
            block 0), ``None`` for the whole model. Under the selection every supported layer
            (:data:`SUPPORTED`) whose weight requires grad and is not shared with another module
            is projected; other trainable parameters (norms, embeddings, grouped convolutions,
            a tied LM head, whose weight's gradient also has the embedding's part) are skipped.

    Returns:
        ``(layers, skipped)``: the :class:`LayerSpec` list and the names of the trainable
        parameters under the selection that no layer covers, both in model order.

    Raises:
        ConfigError: a name matches no module, names an unsupported module, or nothing is selected.
    """
    owners: dict[int, int] = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    supported = [n for n, m in modules.items() if _layout(m) and m.weight.requires_grad and owners[id(m.weight)] == 1]
    if names is not None:
        for wanted in names:
            if not any(under(n, wanted) for n in supported):
                mod = modules.get(wanted)
                if mod is not None and any(True for _ in mod.parameters(recurse=False)):
                    shared = any(owners[id(p)] > 1 for p in mod.parameters(recurse=False))
                    raise ConfigError(f"layer {wanted!r} cannot be projected factored: it is {_why_not(mod, shared)}; "
                                      "leave it out of the selection or use the dense projection")
                raise ConfigError(f"{wanted!r} names no layer the factored projection supports ({SUPPORTED}); "
                                  f"give module names or prefixes, not parameter names; choose from {supported[:20]}")
    selected = [n for n in supported if names is None or any(under(n, w) for w in names)]
    if not selected:
        raise ConfigError(f"the model has no (unshared) layer the factored projection supports ({SUPPORTED}); "
                          "use the dense projection")
    covered = {id(p) for n in selected for p in modules[n].parameters(recurse=False)}
    skipped = [n for n, p in model.named_parameters()
               if p.requires_grad and id(p) not in covered and (names is None or any(under(n, w) for w in names))]
    if skipped:
        total, left = sum(p.numel() for p in model.parameters() if p.requires_grad), set(skipped)
        share = sum(p.numel() for n, p in model.named_parameters() if n in left) / max(total, 1)
        logger.info("factored projection covers %d layers; skips %d parameters (%.1f%% of the trainable "
                    "entries) outside supported layers or shared: %s", len(selected), len(skipped), 100 * share,
                    skipped[:20])
    return [_spec(n, modules[n], _layout(modules[n])) for n in selected], skipped


def factored_layers(model: nn.Module, names: Sequence[str] | None = None) -> list[LayerSpec]:
    """The layers to project (see :func:`factored_selection`, which also returns what is skipped)."""
    return factored_selection(model, names)[0]


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


class FactoredProjector(CapturedLayers):
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
        shapes = [(self.width(s, "out"), self.width(s, "in")) for s in self.layers]
        self.sizes = [h * w for h, w in shapes]  # k_L
        self.k = sum(self.sizes)
        self.dim = sum(s.d_in * s.d_out for s in self.layers)
        gains = [float((self._k(s, "in") or 1) * (self._k(s, "out") or 1)) for s in self.layers]
        self.scales = [math.sqrt(self.k / (self.dim * g)) for g in gains]  # c_L per layer
        self._cache: dict[tuple, Tensor] = {}

    def _k(self, layer: LayerSpec, side: str) -> int | None:
        """The random factor's dimension on ``side`` of ``layer``, ``None`` for the identity."""
        k, d = (self.k_in, layer.d_in) if side == "in" else (self.k_out, layer.d_out)
        return k if k is not None and k < d else None

    def width(self, layer: LayerSpec, side: str) -> int:
        """Projected dimension of ``layer`` on ``side`` (its own dimension for the identity)."""
        return self._k(layer, side) or (layer.d_in if side == "in" else layer.d_out)

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
        seq = np.random.SeedSequence([self.seed, zlib.crc32(layer.name.encode()), SIDES[side]])
        return int(seq.generate_state(1, dtype=np.uint32)[0])

    def factor(self, checkpoint: int, layer: LayerSpec, side: str) -> Tensor | None:
        """``P_in`` (d_in x k_in) or ``P_out`` (d_out x k_out), fp32 CPU; ``None`` = identity."""
        k = self._k(layer, side)
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

    def project(self, captures: Captures, checkpoint: int) -> Tensor:
        """Features from per-layer captures.

        Args:
            captures: per layer (in :attr:`layers` order) the list of its calls' ``(input,
                output gradient)`` (see :func:`capture_layers`); a layer never called has none.
            checkpoint: checkpoint id selecting the matrices.

        Returns:
            (B, k) features, fp32 (fp64 for fp64 inputs).
        """
        parts, ref = [], None
        for (layer, mats), scale in zip(self._calls(captures), self.scales):
            phi = None
            for a, delta in mats:
                ref = a
                p_in = self._factor_on(checkpoint, layer, "in", a)
                p_out = self._factor_on(checkpoint, layer, "out", a)
                pa = a if p_in is None else a @ p_in  # (B, N, k_in)
                pd = delta if p_out is None else delta @ p_out  # (B, N, k_out)
                term = pd.transpose(1, 2) @ pa  # (B, k_out, k_in) = sum_n pd_n pa_n^T
                phi = term if phi is None else phi + term
            if phi is not None:
                phi = phi.reshape(phi.shape[0], -1)
                phi = phi if scale == 1.0 else phi * scale
            parts.append(phi)
        if ref is None:
            raise ShapeError("no selected layer ran in the forward pass; check the layer selection")
        return torch.cat([ref.new_zeros(ref.shape[0], size) if phi is None else phi
                          for phi, size in zip(parts, self.sizes)], dim=1)

class FactoredFeaturizer:
    """Factored-projection features with the interface of :class:`tda.featurizers.gradient.Featurizer`.

    Args:
        model: the network. task: output function.
        k_in, k_out: per-layer projected dimensions (``None``: identity factor); the feature
            dimension is ``self.k = sum over layers of k_out * k_in``.
        seed, kind: projection seed and ``"rademacher"`` / ``"gaussian"``.
        layers: module names or prefixes (see :func:`factored_selection`; tensorsketch:
            :func:`tda.projections.sketch_layers.tensorsketch_selection`), ``None`` for all.
        device: where to compute (default: the model's). chunk_size: examples per forward pass.
        projection: ``"factored"`` (the Kronecker pair above) or ``"tensorsketch"``
            (:class:`tda.projections.tensorsketch.TensorSketchProjector` of those layers, embeddings and
            affine norms into ``k`` outputs; ``k_in``, ``k_out`` and ``kind`` unused). k:
            tensorsketch width.
    """

    def __init__(self, model: nn.Module, task: Task, k_in: int | None = 16, k_out: int | None = 16,
                 seed: int = 0, kind: str = "rademacher", layers: Sequence[str] | None = None,
                 device: str | torch.device | None = None, chunk_size: int | None = None,
                 projection: str = "factored", k: int = 1024) -> None:
        if projection not in ("factored", "tensorsketch"):
            raise ConfigError(f"projection {projection!r} of captured layers is unknown; use 'factored' or "
                              "'tensorsketch' (the dense and sparse projections are tda.featurizers.gradient.Featurizer's)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.task = task
        if projection == "tensorsketch":  # also embeddings and norms; an uncovered parameter is refused
            self.layers, self.skipped = tensorsketch_selection(model, layers), []
            self.projector: FactoredProjector | TensorSketchProjector = TensorSketchProjector(self.layers, k, seed)
        else:
            self.layers, self.skipped = factored_selection(model, layers)
            self.projector = FactoredProjector(self.layers, k_in, k_out, seed, kind)
        self.names = list(dict.fromkeys(p for s in self.layers for p in s.params))
        self.chunk_size = chunk_size
        self.verified = False  # the first batch checks the captures against autograd (verify_captures)

    @property
    def k(self) -> int:
        """Feature dimension: ``sum over layers of k_out * k_in`` (factored), ``k`` (tensorsketch)."""
        return self.projector.k

    @property
    def feature_dim(self) -> int:
        """Width of a stored feature row (the pipeline sizes stores with it); equals :attr:`k`."""
        return self.projector.k

    def spec(self) -> dict[str, Any]:
        """What determines the features (recorded in manifests and compared on reuse): the
        covered parameters, the parameters skipped as unsupported, and the projection."""
        return {"task": self.task.name, "params": list(self.names), "skipped": list(self.skipped),
                **self.projector.spec_dict()}

    def captures(self, batch: Batch, multiple: int = 1, q_out: list | None = None) -> Iterator[Captures]:
        """Captures of a device batch, ``chunk_size`` rows at a time (rounded to a multiple of
        ``multiple``, so that groups of rows, e.g. one example's draws, stay together); ``q_out``
        receives each chunk's Q where its forward pass gives it (:func:`capture_layers`)."""
        n = next(iter(batch.values())).shape[0]
        step = max(multiple, (self.chunk_size or n) // multiple * multiple)
        for lo in range(0, n, step):
            yield capture_layers(self.model, self.task, {k: v[lo: lo + step] for k, v in batch.items()}, self.layers,
                                 q_out)

    #: what a non-finite feature error calls the features
    what = "factored gradient features"

    def project(self, captures: Captures, checkpoint: int) -> Tensor:
        """Features (B, k) of one chunk's captures (subclasses transform them first)."""
        return self.projector.project(captures, checkpoint)

    def clear_cache(self) -> None:
        """Drop per-checkpoint cached matrices (called when the loaded checkpoint changes)."""
        self.projector.clear_cache()

    def featurize_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, k) float32 and Q (B,) float32 for one batch under the loaded weights."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if not self.verified:
            self.verify_captures(batch)
        qs: list = []
        phi = torch.cat([self.project(c, checkpoint) for c in self.captures(batch, q_out=qs)])
        check_finite(phi, ids, self.what)
        # Q from the captures' forward passes (classifiers), else its own pass
        q = torch.cat(qs) if qs and all(x is not None for x in qs) else loss_weights(self.model, self.task, batch)
        check_finite(q, ids, "loss weights Q")
        return phi.float().cpu().numpy(), q.cpu().numpy()

    #: rows of the first batch checked, and the relative tolerance of the check (CPU; on an
    #: accelerator 10x looser: TF32 convolutions differ by ~1e-3 between batch shapes)
    VERIFY_ROWS, VERIFY_RTOL = 2, 1e-3

    def verify_captures(self, batch: Batch) -> None:
        """Check that the captured layers see the whole gradient: the per-example gradient norms
        over the covered parameters from the captures must equal autograd's (an exact
        per-example backward of the first :attr:`VERIFY_ROWS` rows). A model that uses a
        parameter outside its module's forward (``F.linear(x, self.fc.weight)``), or changes
        what a layer saw, fails here instead of giving silently wrong features. The backward
        holds one gradient of the covered parameters (the model's size) once per featurizer."""
        rows = {k: v[: self.VERIFY_ROWS] for k, v in batch.items()}  # entries are batch-first (featurize_loop)
        got = torch.cat([self.projector.grad_norms(c) for c in self.captures(rows)])
        params = dict(self.model.named_parameters())
        with _grad_enabled_on(params[name] for name in self.names):  # frozen covered parameters count too
            grads = loop_per_example_grads(self.model, self.task, rows, self.names)
        exact_t = sum((g.double() ** 2).flatten(1).sum(dim=1) for g in grads.values()).sqrt().to(got.dtype)
        rtol = self.VERIFY_RTOL * (1 if got.device.type == "cpu" else 10)
        if not torch.allclose(got, exact_t, rtol=rtol, atol=1e-6 * float(exact_t.max().clamp_min(1e-30))):
            raise ConfigError(
                f"the {self.projector.__class__.__name__} captures of this model do not match its gradient: "
                f"per-example gradient norms {got.tolist()} from the captured layers, {exact_t.tolist()} from "
                "autograd. The model probably uses a parameter outside its module's forward (e.g. "
                "F.linear(x, self.fc.weight)) or changes a layer's input after the layer; use "
                "featurize.projection: sparse (or dense), which differentiates the whole model")
        self.verified = True

    def featurize(self, state: StateDict | str | Path, checkpoint: int,
                  batches: Iterable[tuple[np.ndarray, Batch]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids, features (B, k), Q (B,))`` per batch under checkpoint ``checkpoint``."""
        yield from featurize_loop(self.model, self.device, self.featurize_batch, state, checkpoint, batches,
                                  self.clear_cache)


__all__ = ["SUPPORTED", "CapturedLayers", "Captures", "FactoredFeaturizer", "FactoredProjector", "FactoredSpec",
           "LayerSpec", "capture_layers", "factored_layers", "factored_selection", "layer_matrices"]
