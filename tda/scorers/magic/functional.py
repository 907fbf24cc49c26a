"""Training as a pure function: a model's parameters as a tuple, the training data collated once.

MAGIC (docs/methods.md section 8) differentiates a whole training run, so every step must be a pure,
deterministic function of (parameters, optimizer state, data weights). This module provides the
pieces the recipes and the reverse pass share:

- :class:`FunctionalModel`: a model built by ``model_fn`` under a fixed seed, run through
  ``torch.func.functional_call`` on a tuple of trainable tensors, always in ``eval()`` mode
  (dropout off; BatchNorm is refused, its running statistics would be hidden state).
- :class:`TrainData`: a data set collated once into a dict of tensors and indexed by row position.
- :class:`CrossEntropyLoss`: the default per-example training loss.
- :func:`check_weights`: per-example data weights ``w`` (n,), default ones.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tda.errors import ConfigError, DataError, NonFiniteError, ShapeError
from tda.models.tasks import Batch, ModelCall

#: Optimizer state: ``(params, *buffers)``, each a tuple with one tensor per trainable parameter.
State = tuple[tuple[Tensor, ...], ...]
#: Per-example training loss: ``loss(model_call, batch) -> (B,)``.
LossFn = Callable[[ModelCall, Batch], Tensor]


class CrossEntropyLoss:
    """Per-example cross-entropy ``-log softmax(model(batch[input_key]))[batch[label_key]]``, shape (B,)."""

    def __init__(self, input_key: str = "x", label_key: str = "y") -> None:
        self.input_key, self.label_key = input_key, label_key

    def __call__(self, model: ModelCall, batch: Batch) -> Tensor:
        for key in (self.input_key, self.label_key):
            if key not in batch:
                raise ShapeError(f"batch has no {key!r} entry (has {sorted(batch)}); pass "
                                 "CrossEntropyLoss(input_key=..., label_key=...) naming your columns as the recipe's loss")
        return F.cross_entropy(model(batch[self.input_key]), batch[self.label_key].long(), reduction="none")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CrossEntropyLoss) and (self.input_key, self.label_key) == (other.input_key,
                                                                                            other.label_key)

    def __hash__(self) -> int:
        return hash((CrossEntropyLoss, self.input_key, self.label_key))

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(input_key={self.input_key!r}, label_key={self.label_key!r})"


class FunctionalModel:
    """A module evaluated functionally on a tuple of its trainable parameters.

    Args:
        module: the model (put in ``eval()`` mode; it is not modified afterwards).

    Attributes:
        names: trainable parameter names (``requires_grad``), in ``named_parameters`` order.
        initial: their initial values (detached copies).
        constants: frozen parameters and buffers, passed unchanged to every call.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model_fn must return a torch.nn.Module, got {type(module).__name__}")
        bn = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn:
            raise ConfigError(f"MAGIC differentiates training as a pure function of the parameters; BatchNorm layers "
                              f"({bn[:3]}) carry running statistics outside it: use LayerNorm or GroupNorm instead")
        self.module = module.eval()
        named = list(module.named_parameters())
        self.names = tuple(n for n, p in named if p.requires_grad)
        if not self.names:
            raise ConfigError("the model has no trainable parameters (none requires grad); nothing to train")
        self.initial = tuple(p.detach().clone() for n, p in named if p.requires_grad)
        self.constants = {n: p.detach() for n, p in named if not p.requires_grad}
        self.constants.update(dict(module.named_buffers()))
        self.dtype, self.device = self.initial[0].dtype, self.initial[0].device

    def call(self, params: Sequence[Tensor]) -> ModelCall:
        """The model as a function of its inputs, with trainable parameters ``params``."""
        mapping = {**self.constants, **dict(zip(self.names, params))}
        return lambda *args, **kwargs: functional_call(self.module, mapping, args, kwargs)

    def state_dict(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        """A full ``state_dict`` of the module with the trainable entries replaced by ``params``."""
        trained = {id(p): params[i] for i, (n, p) in enumerate(
            (n, p) for n, p in self.module.named_parameters() if p.requires_grad)}
        by_name = {n: trained[id(p)] for n, p in self.module.named_parameters(remove_duplicate=False)
                   if id(p) in trained}
        return {k: (by_name[k] if k in by_name else v).detach().clone()
                for k, v in self.module.state_dict().items()}


def build_model(model_fn: Callable[[], nn.Module], seed: int) -> FunctionalModel:
    """``model_fn()`` called with torch's global generator seeded by ``seed`` (restored afterwards),
    so the initialisation is a function of the seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = model_fn()
    return FunctionalModel(module)


def _collate_all(data: Any, collate: Callable, what: str) -> Mapping[str, Tensor]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of tda
        datasets = None
    if datasets is not None and isinstance(data, datasets.Dataset):
        from tda.data.loading import arrow_columns

        return collate(arrow_columns(data.with_format("arrow")[:]))
    if isinstance(data, Mapping):
        return collate(data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise DataError(f"the {what} set must be a datasets.Dataset or a sequence of rows, got {type(data).__name__}")
    return collate([data[i] for i in range(len(data))])


class TrainData:
    """A data set collated once into tensors of one leading length ``n``, indexed by row position.

    Args:
        data: a ``datasets.Dataset`` (``collate`` receives its columns, as in
            :func:`tda.data.loading.iter_batches`), or a sequence of rows (``collate`` receives the list).
        collate: rows -> dict of tensors with a leading batch dimension. It is called once on the
            whole set, so it must treat rows independently (padding pads to the longest row).
        fm: the model; floating tensors are cast to its dtype and moved to its device.
        what: ``"training"`` or ``"query"``, for messages.
    """

    def __init__(self, data: Any, collate: Callable, fm: FunctionalModel, what: str) -> None:
        if data is None or (hasattr(data, "__len__") and len(data) == 0):
            raise DataError(f"the {what} set is empty (0 rows); pass at least one example")
        batch = _collate_all(data, collate, what)
        if not isinstance(batch, Mapping) or not batch or not all(isinstance(v, Tensor) for v in batch.values()):
            raise DataError(f"collate must return a non-empty dict of tensors for the {what} set, got "
                            f"{type(batch).__name__}")
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in batch.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ShapeError(f"collated {what} tensors need one common leading dimension, got {lengths}")
        self.n = next(iter(lengths.values()))
        if self.n == 0:
            raise DataError(f"the {what} set is empty (0 rows); pass at least one example")
        self.tensors = {k: v.to(fm.device, fm.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}

    def batch(self, idx: Tensor) -> dict[str, Tensor]:
        """Rows ``idx`` ((B,) int64 positions) of every tensor."""
        return {k: v[idx] for k, v in self.tensors.items()}


def check_weights(weights: Any, n: int, fm: FunctionalModel) -> Tensor:
    """Data weights as an (n,) tensor of the model's dtype and device; ``None`` gives ones."""
    if weights is None:
        return torch.ones(n, dtype=fm.dtype, device=fm.device)
    w = weights.detach() if isinstance(weights, Tensor) else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if w.shape != (n,):
        raise ShapeError(f"weights must have shape ({n},), one per training example, got {tuple(w.shape)}")
    w = w.to(fm.device, fm.dtype)
    if not torch.isfinite(w).all():
        raise NonFiniteError("weights contain NaN or infinite values; pass finite per-example weights")
    return w
