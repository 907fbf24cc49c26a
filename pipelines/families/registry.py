"""The family registry: ``model.family`` names -> :class:`~pipelines.families.base.Family` objects.

Built-in families register themselves when their module is imported; importing
:mod:`pipelines.families` imports every module of the package, so a new family is one new file
in ``pipelines/families/`` (or one :func:`register_family` call from the user's own code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tda.errors import ConfigError

from pipelines.families.base import Family

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig

_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, replace: bool = False) -> Family:
    """Make ``family`` available as ``model.family: <family.name>``; returns it."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family needs a Family instance, got {type(family).__name__}")
    if family.name in _FAMILIES and not replace:
        raise ConfigError(f"model family {family.name!r} is already registered; pass replace=True")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"model.family is {name!r}; choose one of {tuple(sorted(_FAMILIES))} (or name your own "
                          "model with model.factory, or a Hugging Face folder with model.hf)")
    return _FAMILIES[name]


def family_for(cfg: RunConfig) -> Family:
    return get_family(cfg.model.family)


def registered() -> dict[str, Family]:
    return dict(_FAMILIES)
