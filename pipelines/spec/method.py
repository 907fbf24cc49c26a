"""The method registry: each ``score.scorer`` is one :class:`Method`, declared with everything the
pipeline asks of it.

A method declares its name, the feature kinds it scores (preferred first), its builder and
options type, and its traits: whether it learns from retrained subsets (AirRep), featurizes
queries with a preconditioned featurizer of its own (EK-FAC), has a self-influence ranking for
``tda curate``, can be rebuilt from its saved state alone for the torch-free ``tda query``
(:mod:`pipelines.query.lean`), how ``tda validate`` measures it, whether its fitted state holds
scores of the run's own queries (MAGIC), and how reports title its lists. The pipeline asks the
method (``method_for(cfg.score.scorer).needs_retraining``) instead of keeping lists of names.

This module imports nothing heavy: the torch-free query path reads it. The built-in methods are
declared in :mod:`pipelines.methods.scorers`, imported (by name, on the first look-up) when a method is
asked for; a new method is one :func:`register_method` call, from any module.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tda.errors import ConfigError

if TYPE_CHECKING:
    from pipelines.families.base import Family
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

#: ``build(cfg, paths, family, kind)``: the unfitted scorer for the run's family and feature kind
Builder = Callable[["RunConfig", "RunPaths | None", "Family", str], Any]
#: ``lean(cfg, state)``: the fitted scorer from its saved state, numpy only (raise a TDAError if it cannot)
LeanBuilder = Callable[["RunConfig", "dict[str, Any]"], Any]
#: how ``tda validate`` measures a method besides the run's own: by default, only when named in
#: ``validate.scorers`` (too slow to add to every validation), or never (it needs stages of its own)
VALIDATION = ("default", "opt-in", "own-only")
#: the module declaring the built-in methods
BUILTIN = "pipelines.methods.scorers"


@dataclass(frozen=True)
class Method:
    """One attribution method (``score.scorer: <name>``).

    ``options``: the ``score.options`` dataclass, or ``"module:Name"`` to import it when asked for
    (None: the method takes none). ``retrain(cfg, paths, progress)``: runs the subset retrainings
    it learns from and returns their number. ``query_featurizer(cfg, paths, train_fingerprint)``:
    its own featurizer of the query side (preconditioned, EK-FAC). ``lean``: rebuilds the fitted
    scorer from its saved state without torch. ``validation``: one of :data:`VALIDATION`;
    ``tuned_ridge``: validating it also reports TRAK with its ridge tuned on folds, and the
    ridge's noise; ``linearity_check``: validating it checks that the retrained outcome is linear
    enough for a first-order prediction (MAGIC). ``query_bound``: its fitted state holds scores of
    the run's own queries (the fit's fingerprint covers them). ``title``: its name in reports; ``similarity``:
    its scores are similarities, not signed effects (reports title the lists accordingly).
    """

    name: str
    kinds: tuple[str, ...]
    build: Builder
    options: type | str | None = None
    retrain: Callable[..., int] | None = None
    query_featurizer: Callable[..., Any] | None = None
    self_influence: bool = False
    lean: LeanBuilder | None = None
    validation: str = "default"
    tuned_ridge: bool = False
    linearity_check: bool = False
    query_bound: bool = False
    title: str = ""
    similarity: bool = False

    def __post_init__(self) -> None:
        if self.validation not in VALIDATION:
            raise ConfigError(f"method {self.name!r}: validation is {self.validation!r}; choose one of {VALIDATION}")
        object.__setattr__(self, "kinds", tuple(self.kinds))

    @property
    def needs_retraining(self) -> bool:
        return self.retrain is not None

    @property
    def preconditioned_queries(self) -> bool:
        """Whether the query side is featurized by the method's own (preconditioned) featurizer."""
        return self.query_featurizer is not None

    @property
    def options_type(self) -> type | None:
        if isinstance(self.options, str):
            module, _, name = self.options.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.options


METHODS: dict[str, Method] = {}


def _builtins() -> dict[str, Method]:
    """The registry, with the built-in methods declared (imported by name: they import the pipeline)."""
    importlib.import_module(BUILTIN)
    return METHODS


def register_method(method: Method, replace: bool = False) -> Method:
    """Make ``score.scorer: <method.name>`` available; returns ``method``."""
    if not isinstance(method, Method):
        raise ConfigError(f"register_method needs a Method instance, got {type(method).__name__}")
    if method.name in METHODS and not replace:
        raise ConfigError(f"scorer {method.name!r} is already registered; pass replace=True")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (a no-op for names not registered)."""
    METHODS.pop(name, None)


def methods() -> dict[str, Method]:
    """Every registered method by name, in registration order."""
    return _builtins()


def method_for(name: str) -> Method:
    """The method ``score.scorer`` names; :class:`ConfigError` naming the registered ones if none."""
    registry = _builtins()
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"score.scorer is {name!r}; choose one of {tuple(registry)}{hint}")
    return registry[name]


def find_method(name: str) -> Method | None:
    """The method ``name`` names, or None (reports of names no longer registered)."""
    return _builtins().get(name)


def self_influence_methods() -> tuple[str, ...]:
    """The methods with a self-influence ranking for ``tda curate``, in registration order."""
    return tuple(n for n, m in _builtins().items() if m.self_influence)


def option_types() -> dict[str, type]:
    """``score.scorer`` -> its ``score.options`` type, for the methods that take options."""
    return {n: m.options_type for n, m in _builtins().items() if m.options is not None}


__all__ = ["BUILTIN", "METHODS", "Builder", "LeanBuilder", "Method", "VALIDATION", "find_method", "method_for",
           "methods", "option_types", "register_method", "self_influence_methods", "unregister_method"]
