"""Model families: one file per kind of model, each registering a :class:`Family`.

:mod:`.base` holds the protocol (data, model, task, collate, optional train) and the optional
capabilities (:class:`~.base.Representations`, :class:`~.base.Retraining`,
:class:`~.base.Reporting`); :mod:`.registry` maps ``model.family`` to a family. Importing this
package imports every module in it, so adding a family is one new file here and no edit
elsewhere. Built in: ``classifier`` (MNIST / Fashion-MNIST / CIFAR-2, MLP or CNN),
``diffusion`` (DDPM), ``causal-lm`` (char GPT-2), ``user`` (your ``nn.Module`` by import string,
your checkpoints and data files) and ``hf`` (a Hugging Face ``save_pretrained`` folder).
"""

from __future__ import annotations

import importlib
import pkgutil

from pipelines.families.base import Family, Reporting, Representations, Retraining, SaveFn, collated, resolve_device  # noqa: F401
from pipelines.families.registry import family_for, get_family, register_family, registered  # noqa: F401

_HELPERS = {"base", "registry"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _HELPERS:
        importlib.import_module(f"{__name__}.{_module}")  # each family module registers its families

