"""Checks shared by the configuration sections (:mod:`pipelines.spec.schema`)."""

from __future__ import annotations

from typing import Any

from tda.errors import ConfigError


def _key(obj: Any, name: str) -> str:
    return f"{type(obj).__name__.replace('Config', '').lower()}.{name}"


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"{_key(obj, name)} must be >= 1, got {value}")


def _choice(obj: Any, name: str, options: tuple[str, ...]) -> None:
    if getattr(obj, name) not in options:
        raise ConfigError(f"{_key(obj, name)} is {getattr(obj, name)!r}; choose one of {options}")
