"""What the in-memory attributors share: their default task and private checkpoint copies."""

from __future__ import annotations

import copy
from typing import Mapping

from torch import Tensor, nn

from tda.models.tasks import ClassificationTask, Task


def default_task(model: nn.Module) -> Task:
    """:class:`ClassificationTask`, or the task for a transformers model's head."""
    if type(model).__module__.startswith("transformers."):
        from tda.models.hf import hf_task_for

        return hf_task_for(model)
    return ClassificationTask()


def snapshot(source):
    """A private copy of a state dict (paths are loaded when used)."""
    if isinstance(source, Mapping):
        return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in source.items()}
    return source


__all__ = ["default_task", "snapshot"]
