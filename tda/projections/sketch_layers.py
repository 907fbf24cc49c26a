"""What the TensorSketch projection covers beyond the factored projection's layers, and the
per-example gradients of those parameters (docs/methods.md section 2; :mod:`tda.projections.tensorsketch`).

Coverage (:func:`tensorsketch_selection`), for every trainable parameter under the selection:

- ``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d`` with ``groups=1`` (the factored
  projection's layers, with the same :class:`LayerSpec`, so their sketch is unchanged);
- ``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``): the weight's gradient is
  ``sum_t onehot(id_t) delta_t^T`` (rows = ids, a ``padding_idx`` row gets none), the
  TensorSketch term with ``a_t = onehot(id_t)``: one row bucket and sign per position;
- a weight shared between an embedding and linear layers (a tied LM head) or between linear
  layers: every use is sketched with the hashes of the parameter (its ``key``, the name
  ``model.named_parameters()`` gives it), not of the module, so the entries of the sum of the
  uses' gradients share one hash and the weight is counted once in the dimension;
- per-channel affine norms (:func:`tda.gradients.captures.norm_layout`: LayerNorm, RMSNorm, GroupNorm,
  BatchNorm in eval mode): per example ``sum_t delta_t * xhat_t`` (weight) and
  ``sum_t delta_t`` (bias), each CountSketched with its own hashes.

Anything else trainable under the selection (a custom module's ``nn.Parameter``, a grouped or
1-d convolution, an ``EmbeddingBag``, a shared convolution weight) is a :class:`ConfigError`
naming the parameters: the sketch would silently leave them out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from tda.gradients.captures import (CHUNK_ELEMENTS, NORM_LAYOUTS, SUPPORTED, LayerSpec, _sq_norm, matrix_layout, matrix_spec,
                       norm_layout, under)
from tda.errors import ConfigError

COVERED = f"{SUPPORTED}, nn.Embedding (tied LM heads included), LayerNorm, RMSNorm, GroupNorm, BatchNorm (eval)"


@dataclass(frozen=True)
class SketchLayer(LayerSpec):
    """A layer whose weight is hashed by the parameter's name ``key`` (an embedding, or a linear
    layer sharing its weight), with an embedding's ``padding_idx`` (-1: none)."""

    key: str | None = None
    padding_idx: int = -1

    @property
    def params(self) -> list[str]:
        return [self.key or f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.bias else [])


def covered_sizes(layers: Sequence[LayerSpec]) -> dict[str, int]:
    """Entries of each covered parameter, in layer order, a shared weight once."""
    sizes: dict[str, int] = {}
    for s in layers:
        if s.layout in NORM_LAYOUTS:
            sizes.update(dict.fromkeys(s.params, s.d_out))
        else:
            weight = s.d_out * (s.d_in - int(s.bias))
            sizes.update({s.params[0]: weight, **({s.params[1]: s.d_out} if s.bias else {})})
    return sizes


def _covers(module: nn.Module, param: nn.Parameter, users: list[nn.Module]) -> bool:
    """Whether ``module``'s use of ``param`` is sketched; ``users``: every module holding it."""
    shared = len(users) > 1
    if param is getattr(module, "weight", None) and shared:  # a tied weight: embeddings and linear layers only
        return all(type(m) is nn.Embedding or matrix_layout(m) == "linear" for m in users) and \
            all(_covers(m, param, [m]) for m in users)
    if matrix_layout(module) or norm_layout(module):
        return not shared
    return type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq


def _what(module: nn.Module) -> str:
    groups = getattr(module, "groups", 1)
    return type(module).__name__ + (f" with groups={groups}" if isinstance(groups, int) and groups > 1 else "")


def _spec(name: str, module: nn.Module, key: str, shared: bool) -> LayerSpec:
    layout = matrix_layout(module)
    if layout:
        spec = matrix_spec(name, module, layout)
        return SketchLayer(**asdict(spec), key=key) if shared else spec
    if type(module) is nn.Embedding:
        pad = -1 if module.padding_idx is None else int(module.padding_idx)
        return SketchLayer(name, module.embedding_dim, module.num_embeddings, False, "embedding", key=key,
                           padding_idx=pad)
    return LayerSpec(name, module.weight.numel(), module.weight.numel(), getattr(module, "bias", None) is not None,
                     norm_layout(module))


def _refuse(model: nn.Module, left: dict[str, str]) -> None:
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = sum(p.numel() for n, p in model.named_parameters() if n in left) / max(total, 1)
    listed = "; ".join(f"{n} ({why})" for n, why in list(left.items())[:10])
    raise ConfigError(f"the tensorsketch projection does not cover {len(left)} trainable parameters "
                      f"({100 * share:.1f}% of the entries): {listed}{' ...' if len(left) > 10 else ''}. It covers "
                      f"{COVERED}; use featurize.projection sparse or dense (every parameter), or leave these "
                      "out of featurize.params (module names or prefixes)")


def tensorsketch_selection(model: nn.Module, names: Sequence[str] | None = None) -> list[LayerSpec]:
    """The layers the TensorSketch projection sketches, in module order (see the module docstring).

    Args:
        model: the network. names: module names or prefixes, ``None`` for the whole model; a
            trainable parameter is selected when a module holding it is under one of them, and
            every module holding a selected parameter is sketched whole.

    Raises:
        ConfigError: a name matches no module, nothing trainable is selected, or a selected
            parameter is not covered.
    """
    modules = dict(model.named_modules())
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, mod in modules.items():
        for p in mod.parameters(recurse=False):
            users.setdefault(id(p), []).append((mname, mod))
    for wanted in names or ():
        if not any(under(n, wanted) for n in modules):
            raise ConfigError(f"{wanted!r} names no module; give module names or prefixes, not parameter names; "
                              f"choose from {[n for n in modules if n][:20]}")
    picked = {n: p for n, p in model.named_parameters() if p.requires_grad and
              (names is None or any(under(m, w) for m, _ in users[id(p)] for w in names))}
    if not picked:
        raise ConfigError(f"featurize.params {list(names or [])} select no trainable parameter")
    keys, left, include = {id(p): n for n, p in model.named_parameters()}, {}, set()
    for pname, p in picked.items():
        owners = [m for _, m in users[id(p)]]
        if not all(_covers(m, p, owners) for m in owners):
            left[pname] = ", ".join(sorted({_what(m) for m in owners})) + (" sharing it" if len(owners) > 1 else "")
        include.update(m for m, _ in users[id(p)])
    for mname in include:  # a sketched module is sketched whole: all its parameters must be trainable
        for pname, p in modules[mname].named_parameters(prefix=mname, recurse=False):
            if not p.requires_grad:
                left[pname] = "frozen, in a module whose other parameters are trained"
    if left:
        _refuse(model, left)
    return [_spec(n, m, keys[id(m.weight)], len(users[id(m.weight)]) > 1) for n, m in modules.items() if n in include]


def embedding_sketch(ids: Tensor, delta: Tensor, rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor], k: int,
                     padding_idx: int = -1) -> Tensor:
    """Unscaled TensorSketch of ``sum_t onehot(id_t) delta_t^T``: entry ``(id_t, j)`` goes to bucket
    ``(h_row(id_t) + h_col(j)) mod k`` with sign ``s_row(id_t) s_col(j)``. ids (B, N), delta (B, N, D)
    -> (B, k); ``rows`` / ``cols``: (buckets, signs) of the weight's rows (ids) and columns."""
    b = ids.shape[0]
    sign = rows[1][ids]  # (B, N)
    if padding_idx >= 0:
        sign = sign * (ids != padding_idx)
    where = (rows[0][ids].unsqueeze(-1) + cols[0]) % k  # (B, N, D)
    vals = sign.unsqueeze(-1) * cols[1] * delta
    return delta.new_zeros(b, k).scatter_add_(1, where.reshape(b, -1), vals.reshape(b, -1))


def norm_grads(layer: LayerSpec, xhat: Tensor, delta: Tensor) -> list[Tensor]:
    """Per-example gradients of a norm's weight (``sum_t delta_t * xhat_t``) and bias
    (``sum_t delta_t``): xhat, delta (B, N, C) -> [(B, C)] in :attr:`LayerSpec.params` order."""
    return [(delta * xhat).sum(dim=1)] + ([delta.sum(dim=1)] if layer.bias else [])


def shared_sq_norm(uses: list[tuple[LayerSpec, Tensor, Tensor]]) -> Tensor:
    """``||sum over uses of the weight's gradient||^2`` (plus each linear use's bias) per example,
    (B,), forming the (B, rows, cols) gradient a few examples at a time."""
    first = uses[0][0]
    n_rows, n_cols = first.d_out, first.d_in - int(first.bias)
    b = uses[0][1].shape[0]
    step = max(1, CHUNK_ELEMENTS // max(n_rows * n_cols, 1))
    out = []
    for lo in range(0, b, step):
        g, extra = None, 0.0
        for layer, a, delta in uses:
            a, delta = a[lo: lo + step], delta[lo: lo + step]
            if layer.layout == "embedding":
                keep = delta if layer.padding_idx < 0 else delta * (a != layer.padding_idx).unsqueeze(-1)
                part = delta.new_zeros(a.shape[0], n_rows, n_cols).scatter_add_(
                    1, a.unsqueeze(-1).expand(-1, -1, n_cols), keep)
            else:
                part = delta.transpose(1, 2) @ a[..., :n_cols]  # (b, rows, cols)
                if layer.bias:
                    extra = extra + delta.sum(dim=1).pow(2).sum(dim=1)
            g = part if g is None else g + part
        out.append(g.pow(2).sum(dim=(1, 2)) + extra)
    return torch.cat(out)


def term_sq_norm(layer: LayerSpec, a: Tensor, delta: Tensor) -> Tensor:
    """Squared norm of a matrix layer's or a norm's per-example gradient, (B,) (embeddings and
    shared weights: :func:`shared_sq_norm`)."""
    if layer.layout in NORM_LAYOUTS:
        return sum(g.pow(2).sum(dim=1) for g in norm_grads(layer, a, delta))
    return _sq_norm(a, delta)


__all__ = ["COVERED", "SketchLayer", "covered_sizes", "embedding_sketch", "norm_grads",
           "shared_sq_norm", "term_sq_norm", "tensorsketch_selection"]
