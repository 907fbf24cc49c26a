"""Module attributes imported on first use (PEP 562), so that importing a package is cheap:
``import tda`` (and ``tda.scorers``, ``pipelines.stages``) load no torch until a name that needs
it is touched."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a public name to the submodule
    (relative to ``package``) defining it; the value is imported once and cached in ``namespace``
    (the module's ``globals()``)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__


__all__ = ["lazy_exports"]
