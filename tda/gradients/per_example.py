"""Per-example gradients of a task's output with ``torch.func`` (docs/methods.md section 1).

``vmap(grad(f))`` over ``functional_call``: each example is run as a batch of one, so the
model must not mix examples (BatchNorm in train mode, for instance); the model is put in eval
mode while gradients are taken and its mode restored afterwards.

Models whose code cannot run under ``vmap`` (``.item()``, data-dependent control flow, such as
the attention-mask builders of Hugging Face transformers) use :func:`loop_per_example_grads`, one
autograd pass per example; :func:`vmap_incompatible` recognises functorch's refusals so callers
(:class:`tda.featurizers.gradient.Featurizer`) can switch to it automatically. Tasks may split a batch into
groups that run alone (:meth:`tda.models.tasks.Task.example_groups`, e.g. padded text trimmed per real
length); :func:`task_groups` returns them.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from tda.errors import ConfigError, NonFiniteError
from tda.models.tasks import Batch, Task


def select_parameters(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters to differentiate, in the model's order.

    Args:
        model: the network.
        names: exact parameter names, or name prefixes (``"0"`` selects ``"0.weight"`` and
            ``"0.bias"``). ``None`` selects every parameter that requires grad.

    Raises:
        ConfigError: a name matches no parameter.
    """
    all_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if names is None:
        return all_names
    chosen = []
    for wanted in names:
        hits = [n for n in all_names if n == wanted or n.startswith(wanted + ".")]
        if not hits:
            raise ConfigError(
                f"parameter {wanted!r} is not in the model; choose from {all_names[:20]}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in all_names if n in chosen]


def parameter_count(model: nn.Module, names: Sequence[str]) -> int:
    """Total number of scalars in the named parameters (the gradient dimension d)."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _split_params(model: nn.Module, names: Sequence[str]) -> tuple[dict, dict]:
    wanted = set(names)
    trainable, frozen = {}, {}
    for n, p in model.named_parameters():
        (trainable if n in wanted else frozen)[n] = p.detach()
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    return trainable, frozen


def per_example_grads(
    model: nn.Module,
    task: Task,
    batch: Batch,
    names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradient of ``task.output`` for every example of ``batch``.

    The task's model call takes positional and keyword tensors (``model(x)`` or
    ``model(input_ids=..., attention_mask=...)``), each a batch of one.

    Args:
        model: the network, already holding the checkpoint's weights.
        task: output function.
        batch: mapping of tensors with leading dimension B.
        names: parameters to differentiate (see :func:`select_parameters`).
        chunk_size: examples per vmap chunk (bounds memory), ``None`` for all at once.

    Returns:
        Mapping parameter name -> tensor of shape (B, *param.shape).

    Raises:
        RuntimeError: from functorch when the model's code cannot run under vmap
            (:func:`vmap_incompatible` is true for it); use :func:`loop_per_example_grads`.
    """
    names = select_parameters(model, names)
    trainable, frozen = _split_params(model, names)

    def f(params: dict, example: Mapping[str, Tensor]) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}  # batch of one

        def call(*args: Tensor, **kwargs: Tensor) -> Tensor:
            return functional_call(model, {**frozen, **params}, args, kwargs or None)

        return task.output(call, one).squeeze(0)

    with eval_mode(model):
        grads = vmap(grad(f), in_dims=(None, 0), chunk_size=chunk_size)(trainable, dict(batch))
    return {n: grads[n] for n in names}


def flatten_grads(grads: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Concatenate per-example gradients in ``names`` order: (B, d), float32 or wider."""
    parts = [grads[n].reshape(grads[n].shape[0], -1) for n in names]
    flat = torch.cat(parts, dim=1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


_VMAP_REFUSALS = re.compile(r"vmap|functorch|BatchedTensor|data-dependent|\.item\(\)|doesn't have storage",
                            re.IGNORECASE)


def vmap_incompatible(exc: BaseException) -> bool:
    """True when ``exc`` says the model's code cannot run under ``vmap`` (``.item()``,
    data-dependent control flow, an operator without a batching rule), not that the inputs are wrong."""
    return isinstance(exc, RuntimeError) and bool(_VMAP_REFUSALS.search(str(exc)))


def loop_per_example_grads(model: nn.Module, task: Task, batch: Batch,
                           names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Gradient of ``task.output`` for every example of ``batch``, one autograd pass per example.

    The path for models that cannot run under ``vmap``: each example runs alone as a batch of
    one (rows of ``batch`` as given; :class:`tda.featurizers.gradient.Featurizer` first trims padded text
    through :meth:`tda.models.tasks.Task.example_groups`). Same result as :func:`per_example_grads`,
    ``B`` times the Python overhead.

    Returns:
        Mapping parameter name -> tensor of shape (B, *param.shape).
    """
    names = select_parameters(model, names)
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    n_rows = next(iter(batch.values())).shape[0]
    rows: list[list[Tensor]] = []
    with eval_mode(model), torch.enable_grad():
        for i in range(n_rows):
            f = task.output(model, {k: v[i: i + 1] for k, v in batch.items()})
            if f.numel() != 1:
                raise ConfigError(f"the task output of one example has shape {tuple(f.shape)}; a task must "
                                  "return one value per example, shape (B,)")
            grads = torch.autograd.grad(f.sum(), chosen, allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(chosen, grads)])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


def task_groups(task: Task, batch: Batch) -> list[tuple[Tensor, Batch]]:
    """``task.example_groups(batch)``, or the whole batch as one group for tasks without it."""
    split = getattr(task, "example_groups", None)
    if split is None:
        first = next(iter(batch.values()))
        return [(torch.arange(first.shape[0], device=first.device), batch)]
    return split(batch)


def loss_weights(model: nn.Module, task: Task, batch: Batch) -> Tensor:
    """``Q`` per example with the model in eval mode, shape (B,), group by group (see :func:`task_groups`)."""
    with eval_mode(model), torch.no_grad():
        groups = task_groups(task, batch)
        if len(groups) == 1:
            return task.loss_weight(model, groups[0][1]).float()
        first = next(iter(batch.values()))
        out = torch.empty(first.shape[0], dtype=torch.float32, device=first.device)
        for rows, sub in groups:
            out[rows] = task.loss_weight(model, sub).float()
        return out


def check_finite(values: Tensor, ids: Sequence[int] | Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the examples whose rows are not finite."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        bad_ids = [int(ids[i]) for i in idx[:10]]
        raise NonFiniteError(
            f"{what} are NaN or infinite for {len(idx)} example(s), ids {bad_ids}"
            f"{' ...' if len(idx) > 10 else ''}; check the inputs of these examples and the "
            "checkpoint (a diverged training run gives NaN weights); nothing was stored"
        )


def linear_layers_for(model: nn.Module, names: Sequence[str]) -> list[tuple[str, str, nn.Linear]] | None:
    """``(param name, 'weight'|'bias', layer)`` for each name when all are ``nn.Linear`` params, else None."""
    out = []
    for n in names:
        mod_name, _, leaf = n.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            return None
        if type(mod) is not nn.Linear or leaf not in ("weight", "bias"):
            return None
        out.append((n, leaf, mod))
    return out


def linear_per_example_grads(model: nn.Module, task: Task, batch: Batch, names: Sequence[str]) -> Tensor | None:
    """Flat per-example gradients (B, d) for models whose selected parameters are all in ``nn.Linear``.

    One batched forward and backward: each layer's per-example weight gradient is the outer
    product of its output gradient and its input (summed over any token dimensions), written
    straight into the (B, d) buffer in ``names`` order. Exact when examples do not interact in
    the forward pass (the same assumption the vmap path makes). Returns None (caller falls back
    to vmap) when a selected parameter is not in a plain ``nn.Linear`` or a layer runs more
    than once per forward.
    """
    layers = linear_layers_for(model, names)
    if layers is None:
        return None
    mods = {id(m): m for _, _, m in layers}
    inputs: dict[int, list[Tensor]] = {i: [] for i in mods}
    outputs: dict[int, list[Tensor]] = {i: [] for i in mods}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
        inputs[id(mod)].append(args[0].detach())
        outputs[id(mod)].append(out)

    handles = [m.register_forward_hook(hook) for m in mods.values()]
    try:
        with eval_mode(model), torch.enable_grad():
            f = task.output(model, batch)
            if any(len(v) != 1 for v in outputs.values()) or f.ndim != 1:
                return None
            if any(inputs[i][0].shape[0] != f.shape[0] or inputs[i][0].ndim < 2 for i in mods):
                return None  # batch not in the leading dimension (e.g. sequence-first layers)
            outs = [outputs[i][0] for i in mods]
            deltas = dict(zip(mods, torch.autograd.grad(f.sum(), outs, allow_unused=True)))
    finally:
        for h in handles:
            h.remove()
    b = f.shape[0]
    dtype = torch.float64 if any(inputs[i][0].dtype == torch.float64 for i in mods) else torch.float32
    sizes = [m.weight.numel() if leaf == "weight" else m.bias.numel() for _, leaf, m in layers]
    flat = torch.empty(b, sum(sizes), dtype=dtype, device=f.device)
    lo = 0
    for (_, leaf, m), size in zip(layers, sizes):
        delta, a = deltas[id(m)], inputs[id(m)][0]
        view = flat[:, lo: lo + size]
        lo += size
        if delta is None:
            view.zero_()
            continue
        delta = delta.to(dtype).reshape(b, -1, m.out_features)  # (B, T, out)
        if leaf == "bias":
            view.copy_(delta.sum(dim=1))
            continue
        a = a.to(dtype).reshape(b, -1, m.in_features)  # (B, T, in)
        if delta.shape[1] == 1:
            prod = torch.mul(delta.transpose(1, 2), a)  # (B, out, 1) * (B, 1, in)
        else:
            prod = torch.bmm(delta.transpose(1, 2), a)  # sum over tokens
        view.copy_(prod.reshape(b, -1))
    return flat
