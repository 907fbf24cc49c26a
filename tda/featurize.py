"""Featurization: per-example gradients of a task, projected per checkpoint.

Glue between :mod:`tda.gradients` and :mod:`tda.projectors`: load a checkpoint into the model,
compute per-example gradients batch by batch, project them with the checkpoint's matrix, check
the result is finite, and return float32 features with the loss weights ``Q``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .gradients import (check_finite, flatten_grads, loss_weights, parameter_count,
                        per_example_grads, select_parameters)
from .projectors import Projector
from .tasks import Batch, Task

StateDict = Mapping[str, Tensor]


def load_checkpoint(source: StateDict | str | Path) -> dict[str, Tensor]:
    """A state dict from a mapping or a ``torch.save`` file (loaded with ``weights_only=True``)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a weights-only state dict ({exc}); save it "
            "with torch.save(model.state_dict(), path)"
        ) from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def apply_checkpoint(model: nn.Module, state: StateDict, label: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, with an error naming the mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{label} does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {wrong[:5]}; build the model with the "
            "architecture the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)


class Featurizer:
    """Projected per-example gradients of ``task`` for ``model`` under given checkpoints.

    Args:
        model: the network (its weights are replaced by each checkpoint in turn).
        task: output function.
        k: projection dimension.
        seed: projection seed.
        kind: ``"rademacher"`` or ``"gaussian"``.
        param_names: parameters to differentiate (names or prefixes), ``None`` for all.
        device: where gradients are computed (default: the model's device).
        backend: projector backend (see :class:`tda.projectors.Projector`).
        chunk_size: vmap chunk size bounding gradient memory.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        k: int = 1024,
        seed: int = 0,
        kind: str = "rademacher",
        param_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
        cache_bytes: int = 4 << 30,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.task = task
        self.names = select_parameters(model, param_names)
        self.dim = parameter_count(model, self.names)
        self.projector = Projector(self.dim, k, seed, kind, backend=backend, cache_bytes=cache_bytes)
        self.chunk_size = chunk_size

    def spec(self) -> dict[str, Any]:
        """What determines the features (recorded in manifests and compared on reuse)."""
        return {"task": self.task.name, "params": list(self.names), **self.projector.spec_dict()}

    def _to_device(self, batch: Batch) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def featurize_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, k) float32 and Q (B,) float32 for one batch under the loaded weights."""
        batch = self._to_device(batch)
        grads = per_example_grads(self.model, self.task, batch, self.names, self.chunk_size)
        phi = self.projector.project(flatten_grads(grads, self.names), checkpoint)
        check_finite(phi, ids, "projected gradients")
        q = loss_weights(self.model, self.task, batch)
        check_finite(q, ids, "loss weights Q")
        return phi.float().cpu().numpy(), q.cpu().numpy()

    def featurize(
        self,
        state: StateDict | str | Path,
        checkpoint: int,
        batches: Iterable[tuple[np.ndarray, Batch]],
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids, features (B, k), Q (B,))`` per batch under checkpoint ``checkpoint``."""
        apply_checkpoint(self.model, load_checkpoint(state), f"checkpoint {checkpoint}")
        self.model.to(self.device)
        try:
            for ids, batch in batches:
                phi, q = self.featurize_batch(batch, ids, checkpoint)
                yield np.asarray(ids, dtype=np.int64), phi, q
        finally:
            self.projector.clear_cache()
