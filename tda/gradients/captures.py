"""Captured layers: per-example inputs and output gradients of linear and convolutional layers,
and the per-position matrices both projections of captured layers read (docs/methods.md section 2;
:mod:`tda.featurizers.factored`, :mod:`tda.projections.tensorsketch`).

For a linear layer ``y_t = W a_t + b`` applied at positions t (tokens, or one position for a
plain MLP), the per-example gradient of the output ``f`` is ``G = sum_t delta_t [a_t; 1]^T``
(``d_out x d_in'``, the bias as an extra input column of ones, ``delta_t = df/dy_t``);
transformers' ``Conv1D`` stores its weight as ``(in, out)``, so ``G`` is the transpose of its
weight-gradient layout.

A 2-d convolution (``nn.Conv2d``, ``groups=1``) is the same linear map applied at every output
position t: ``y_t = W a_t + b`` with ``W`` the weight flattened to ``(C_out, C_in kh kw)`` and
``a_t`` the input patch that position reads (``torch.nn.functional.unfold`` of the padded
input, with the layer's stride and dilation; channel-major, matching the weight's layout), so
its weight gradient per example is ``sum_t delta_t [a_t; 1]^T`` with T = the number of output
positions.

Activations and output gradients are captured with forward hooks and one batched backward pass
of ``sum_b f_b`` (examples must not interact, as for the vmap path: the model runs in eval
mode), so ``df/dy`` of example b is exactly ``delta`` of example b. The exact L2 norm of each
example's covered gradient (what Diffusion-ReTrac divides by) follows from the same captures
(:meth:`CapturedLayers.grad_norms`) without forming the gradient when that is cheaper. Which
layers are captured is :func:`tda.featurizers.factored.factored_selection`'s choice, or for the TensorSketch
projection :func:`tda.projections.sketch_layers.tensorsketch_selection`'s, which adds embeddings (ids and
output gradients) and per-channel affine norms (``xhat``, the normalised input, and output
gradients; :func:`norm_layout`, :func:`normalized`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tda.errors import ShapeError
from tda.gradients.per_example import eval_mode
from tda.models.tasks import Batch, Task

#: The two sides of a layer, as seeds of their random maps see them.
SIDES = {"in": 0, "out": 1}

#: Layouts of the layers both projections read as ``G = sum_t delta_t a_t^T``; the TensorSketch
#: projection also reads embeddings (``a_t = onehot(id_t)``) and per-channel affine norms.
MATRIX_LAYOUTS = ("linear", "conv1d", "conv2d")
NORM_LAYOUTS = ("layernorm", "channelnorm")
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d with groups=1"

#: Raw captures: per layer, one ``(input, output gradient)`` pair per call of the layer.
Captures = list[list[tuple[Tensor, Tensor]]]


@dataclass(frozen=True)
class LayerSpec:
    """One projected layer. ``d_in`` counts the bias column; ``layout`` is ``"linear"`` (weight
    ``(out, in)``), ``"conv1d"`` (transformers' ``Conv1D``, weight ``(in, out)``) or ``"conv2d"``
    (weight ``(out, C_in, kh, kw)``, ``d_in = C_in kh kw (+ 1)``). Convolutions also record the
    geometry their input patches are unfolded with: ``kernel``, ``stride``, ``dilation``, ``pad``
    (``F.pad`` widths: left, right, top, bottom) and ``padding_mode``."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    layout: str
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pad: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @property
    def params(self) -> list[str]:
        """Names of the parameters this layer's feature covers."""
        return [f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.bias else [])



def matrix_layout(module: nn.Module) -> str | None:
    """The layout of a layer both projections read as a matrix gradient, ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d"
    if type(module) is nn.Conv2d and module.groups == 1:
        return "conv2d"
    return None


def matrix_spec(name: str, module: nn.Module, layout: str) -> LayerSpec:
    """The :class:`LayerSpec` of a layer of layout ``layout`` (see :func:`matrix_layout`)."""
    w = module.weight
    bias = getattr(module, "bias", None) is not None
    if layout == "conv2d":
        return LayerSpec(name, int(w[0].numel()) + int(bias), int(w.shape[0]), bias, layout,
                         kernel=tuple(int(k) for k in module.kernel_size),
                         stride=tuple(int(v) for v in module.stride),
                         dilation=tuple(int(v) for v in module.dilation),
                         pad=tuple(int(v) for v in module._reversed_padding_repeated_twice),
                         padding_mode=module.padding_mode)
    d_out, d_in = (w.shape[0], w.shape[1]) if layout == "linear" else (w.shape[1], w.shape[0])
    return LayerSpec(name, int(d_in) + int(bias), int(d_out), bias, layout)


def norm_layout(module: nn.Module) -> str | None:
    """``"layernorm"`` (nn.LayerNorm, nn.RMSNorm: normalised over the trailing dims) or
    ``"channelnorm"`` (nn.GroupNorm, nn.BatchNorm*d with running statistics: dim 1) for a
    per-channel affine norm the TensorSketch projection covers, ``None`` for any other module."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.elementwise_affine:
        return "layernorm"
    if isinstance(module, nn.GroupNorm) and module.affine:
        return "channelnorm"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine and module.running_mean is not None:
        return "channelnorm"  # eval mode: the running statistics, so examples do not interact
    return None


def normalized(module: nn.Module, x: Tensor) -> Tensor:
    """``xhat``, the input of a norm layer normalised as the module does (its eps, groups or running
    statistics), before its affine map ``xhat * weight + bias``: the weight's gradient is
    ``sum_t delta_t * xhat_t``. fp32 (fp64 for fp64 inputs), detached."""
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    return F.batch_norm(x, module.running_mean.to(x.dtype), module.running_var.to(x.dtype), training=False,
                        eps=module.eps)


def layer_matrices(layer: LayerSpec, inp: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position inputs and output gradients of one call of a layer.

    Args:
        layer: the layer. inp: its input, (B, ..., in) for linear layers, (B, C_in, H, W) for
            convolutions. grad: ``df/dy`` of its output, same shape as the output.

    Returns:
        ``a`` (B, N, d_in) with a ones column for the bias, and ``delta`` (B, N, d_out), N the
        number of positions (tokens, or output pixels of a convolution). The TensorSketch-only
        layouts: an embedding's ids (B, N) and delta (B, N, d_in); a norm's ``xhat`` (captured
        already normalised, see :func:`normalized`) and delta, both (B, N, d_out).
    """
    b = inp.shape[0]
    if layer.layout == "embedding":  # ids (B, N) and delta (B, N, embedding dim)
        return inp.reshape(b, -1), grad.reshape(b, -1, grad.shape[-1])
    if layer.layout == "channelnorm":  # channels at dim 1: (B, N, C) with N the other positions
        return (inp.reshape(b, inp.shape[1], -1).transpose(1, 2), grad.reshape(b, grad.shape[1], -1).transpose(1, 2))
    if layer.layout == "layernorm":  # the normalised trailing dims flattened to d_out
        return inp.reshape(b, -1, layer.d_out), grad.reshape(b, -1, layer.d_out)
    if layer.layout == "conv2d":
        if inp.ndim != 4:
            raise ShapeError(f"conv layer {layer.name} sees input of shape {tuple(inp.shape)}; the factored "
                             "projection needs batched (B, C, H, W) inputs")
        if any(layer.pad):
            inp = F.pad(inp, layer.pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
        a = F.unfold(inp, layer.kernel, dilation=layer.dilation, stride=layer.stride).transpose(1, 2)  # (B, L, C kh kw)
        delta = grad.reshape(b, layer.d_out, -1).transpose(1, 2)  # (B, L, C_out)
    else:
        a = inp.reshape(b, -1, inp.shape[-1])  # (B, N, in)
        delta = grad.reshape(b, -1, layer.d_out)  # (B, N, out)
    if a.shape[1] != delta.shape[1]:
        raise ShapeError(f"layer {layer.name}: {a.shape[1]} input positions but {delta.shape[1]} output positions")
    if layer.bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a, delta


def _sq_norm(a: Tensor, delta: Tensor) -> Tensor:
    """``||sum_t delta_t a_t^T||_F^2`` per example, (B,), by the cheaper of forming the gradient
    (N d_in d_out) or the position Gram matrices (N^2 (d_in + d_out))."""
    n, d_in, d_out = a.shape[1], a.shape[2], delta.shape[2]
    if d_in * d_out <= n * (d_in + d_out):
        return (delta.transpose(1, 2) @ a).pow(2).sum(dim=(1, 2))  # (B, d_out, d_in) -> (B,)
    return ((delta @ delta.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))  # (B, N, N) -> (B,)



#: Largest intermediate (elements) one chunk of examples may allocate per layer.
CHUNK_ELEMENTS = 1 << 24


def under(name: str, wanted: str) -> bool:
    """Whether module or parameter ``name`` is ``wanted`` or inside it (a selection by prefix)."""
    return name == wanted or name.startswith(wanted + ".")


def regroup(a: Tensor, delta: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Each run of ``group`` rows as one example whose gradient is their mean: the draws as extra
    positions and delta / group."""
    if group == 1:
        return a, delta
    if a.shape[0] % group:
        raise ShapeError(f"{a.shape[0]} rows do not split into groups of {group} draws")
    return (a.reshape(a.shape[0] // group, -1, *a.shape[2:]),
            delta.reshape(delta.shape[0] // group, -1, delta.shape[2]) / group)


class CapturedLayers:
    """Base of the projectors that read captured layers (:class:`FactoredProjector`,
    :class:`tda.projections.tensorsketch.TensorSketchProjector`): turns captures into per-position matrices
    and gives each example's exact gradient norm. Subclasses set :attr:`layers`."""

    layers: list[LayerSpec]

    def _calls(self, captures: Captures) -> Iterator[tuple[LayerSpec, list[tuple[Tensor, Tensor]]]]:
        """Per layer, its calls as ``(a, delta)`` in fp32 (fp64 for fp64 inputs), unfolded one
        layer at a time so that only one layer's patches are in memory."""
        if len(captures) != len(self.layers):
            raise ShapeError(f"{len(captures)} captures for {len(self.layers)} layers")
        for layer, calls in zip(self.layers, captures):
            mats = []
            for inp, grad in calls:
                dtype = torch.float64 if inp.dtype == torch.float64 else torch.float32
                if layer.layout == "embedding":  # integer ids stay ids; delta is (B, N, d_in)
                    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
                    a, delta = layer_matrices(layer, inp, grad.to(dtype))
                    widths, want = (delta.shape[-1],), (layer.d_in,)
                else:
                    a, delta = layer_matrices(layer, inp.to(dtype), grad.to(dtype))
                    widths, want = (a.shape[-1], delta.shape[-1]), (layer.d_in, layer.d_out)
                if widths != want:
                    raise ShapeError(f"layer {layer.name}: captured widths {', '.join(map(str, widths))} "
                                     f"but the projector expects {', '.join(map(str, want))}")
                mats.append((a, delta))
            yield layer, mats

    def grad_norms(self, captures: Captures, group: int = 1) -> Tensor:
        """Exact L2 norm of each example's gradient over the covered parameters, (B,), from the
        same captures (independent of the projection). With ``group`` > 1, each run of ``group``
        consecutive rows is one example's draws and the norm is that of their mean gradient:
        (B / group,)."""
        total = None
        for _, mats in self._calls(captures):
            if not mats:
                continue
            # calls as extra positions: (B, N, d_in); the mean over draws of sum_t delta_t a_t^T
            a, delta = regroup(torch.cat([m[0] for m in mats], dim=1), torch.cat([m[1] for m in mats], dim=1), group)
            sq = _sq_norm(a, delta)
            total = sq if total is None else total + sq
        if total is None:
            raise ShapeError("no selected layer ran in the forward pass; check the layer selection")
        return total.clamp_min(0).sqrt()



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


def _hook(layer: LayerSpec, seen: list[tuple[Tensor, Tensor, int]], rows: int):
    """Forward hook recording ``(input, output, output version)``; an embedding called on one row
    of ids for a batch of ``rows`` (position ids) returns its output expanded to the batch."""
    def fn(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        inp = args[0]
        if layer.layout == "embedding" and inp.shape[0] == 1 < rows:
            inp, output = inp.expand(rows, *inp.shape[1:]), output.expand(rows, *output.shape[1:])
        seen.append((inp, output, output._version))
        return output if inp is not args[0] else None  # the batch reads each example's own copy
    return fn


def capture_layers(model: nn.Module, task: Task, batch: Batch, layers: Sequence[LayerSpec],
                   q_out: list | None = None) -> Captures:
    """Per-example inputs and output gradients of each layer, one entry per call.

    Runs ``task.output`` on the whole batch in eval mode with forward hooks, then one backward
    pass of ``sum_b f_b`` to the layer outputs. A layer called several times contributes all
    its calls (the weight gradient is their sum); a layer never called contributes none. An
    embedding called on one row of ids for the whole batch (GPT-2's position ids, ``(1, T)``)
    has its output expanded to the batch inside the forward pass (the same values wherever the
    model broadcasts it against the batch), so each example's copy has its own gradient.

    ``q_out``: a list that receives ``Q`` (B,) float32 from the same forward pass when the task
    gives it there (:meth:`tda.models.tasks.Task.output_and_loss_weight`), else ``None``.

    Returns:
        Per layer the list of its calls' ``(input, output gradient)``, detached, as the layer
        saw them (a norm's input normalised, :func:`normalized`; turned into per-position
        matrices by :func:`layer_matrices`).

    Raises:
        ShapeError: the output is not (B,), a layer's input is not batch-first, or a layer's
            output was modified in place after the layer (its gradient would be wrong).
    """
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[Tensor, Tensor, int]]] = {s.name: [] for s in layers}
    rows = next(iter(batch.values())).shape[0]
    handles = [modules[s.name].register_forward_hook(_hook(s, seen[s.name], rows)) for s in layers]
    weights = [modules[s.name].weight for s in layers]
    try:
        with eval_mode(model), torch.enable_grad(), _grad_enabled_on(weights):
            f, q = task.output_and_loss_weight(model, batch)  # (B,), (B,) or None
            if q_out is not None:
                q_out.append(None if q is None else q.detach().float())
            if f.ndim != 1:
                raise ShapeError(f"task output must be (B,), got {tuple(f.shape)}")
            for s in layers:
                for inp, out, version in seen[s.name]:
                    if out._version != version:
                        raise ShapeError(f"the output of layer {s.name} is modified in place after the layer "
                                         "(e.g. ReLU(inplace=True)); make that operation out of place or use the "
                                         "dense projection")
                    if inp.shape[0] != f.shape[0]:
                        raise ShapeError(f"layer {s.name} sees inputs of shape {tuple(inp.shape)}: the leading "
                                         f"dimension must be the batch ({f.shape[0]}); use the dense projection")
            outs = [o for s in layers for _, o, _ in seen[s.name]]
            grads = iter(torch.autograd.grad(f.sum(), outs, allow_unused=True) if outs else [])
    finally:
        for h in handles:
            h.remove()
    captures: Captures = []
    for s in layers:
        calls = []
        for inp, out, _ in seen[s.name]:
            g = next(grads)
            inp = normalized(modules[s.name], inp) if s.layout in NORM_LAYOUTS else inp.detach()
            calls.append((inp, (torch.zeros_like(out) if g is None else g).detach()))
        captures.append(calls)
    return captures


__all__ = ["MATRIX_LAYOUTS", "NORM_LAYOUTS", "SIDES", "SUPPORTED", "CapturedLayers", "Captures", "LayerSpec",
           "capture_layers", "layer_matrices", "matrix_layout", "matrix_spec", "norm_layout", "normalized"]
