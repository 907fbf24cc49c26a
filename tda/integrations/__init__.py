"""Recording hooks for training frameworks: :mod:`tda.integrations.hf` (``CheckpointCallback``
for a Hugging Face ``Trainer``). Plain PyTorch loops use :class:`tda.CheckpointRecorder`.

Names are imported lazily, so ``import tda.integrations`` needs no transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tda.lazy import lazy_exports

_EXPORTS = {"CheckpointCallback": "hf", "recipe_from_args": "hf"}

__all__ = ["CheckpointCallback", "recipe_from_args"]

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from tda.integrations.hf import CheckpointCallback, recipe_from_args
