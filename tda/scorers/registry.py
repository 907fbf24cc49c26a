"""The scorers the Python API builds by name (``tda.Attributor(scorer="trak")``,
:func:`tda.scorers.make_scorer`): one :class:`ScorerEntry` per name, in one registry.

An entry names the scorer, where its class or factory lives (imported on first use, so this
module loads no torch), what it scores and the options it takes by default for a given number
of checkpoints. What it scores decides how the API feeds it:

- ``"gradients"``: the Attributor's projected per-example gradients;
- ``"representations"``: hidden representations (:class:`tda.RepresentationFeaturizer`);
- ``"preconditioned"``: features of its own through fitted curvature factors (EK-FAC);
- ``"metagradients"``: scores of its own, by replaying training (MAGIC).

A new scorer is one :func:`register_scorer` call, from any module; ``tda run`` declares its
methods, with the pipeline's traits, in ``pipelines/methods/scorers.py``.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from tda.errors import ConfigError

#: what a scorer scores (see the module docstring)
FEATURES = ("gradients", "representations", "preconditioned", "metagradients")


@dataclass(frozen=True)
class ScorerEntry:
    """One scorer known by name.

    ``target``: ``"module:attribute"`` of the class or factory (``target(**options)`` builds the
    scorer), or the callable itself. ``defaults(checkpoints)``: options it gets unless given (TracIn
    weighs checkpoints equally).
    """

    name: str
    target: str | Callable[..., Any]
    features: str = "gradients"
    defaults: Callable[[int], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ConfigError(f"scorer {self.name!r}: features is {self.features!r}; choose one of {FEATURES}")

    def factory(self) -> Callable[..., Any]:
        if callable(self.target):
            return self.target
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def build(self, checkpoints: int = 1, **options: Any) -> Any:
        """The scorer with ``options`` over this entry's defaults for ``checkpoints`` checkpoints."""
        return self.factory()(**{**(self.defaults(checkpoints) if self.defaults else {}), **options})


_ENTRIES: dict[str, ScorerEntry] = {}


def register_scorer(entry: ScorerEntry) -> ScorerEntry:
    """Add ``entry`` (its name must be new)."""
    if entry.name in _ENTRIES:
        raise ConfigError(f"scorer {entry.name!r} is registered already")
    _ENTRIES[entry.name] = entry
    return entry


def unregister_scorer(name: str) -> None:
    """Remove a scorer registered by :func:`register_scorer` (tests, plug-ins that unload)."""
    _ENTRIES.pop(name, None)


def scorer_names() -> tuple[str, ...]:
    return tuple(_ENTRIES)


def scorer_entry(name: str) -> ScorerEntry:
    """The entry of ``name``, else a ConfigError listing the names (with the closest one)."""
    if name not in _ENTRIES:
        close = difflib.get_close_matches(name, list(_ENTRIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown scorer {name!r}{hint}; choose one of {sorted(_ENTRIES)} or pass a tda.Scorer")
    return _ENTRIES[name]


def make_scorer(name: str, **kwargs: Any) -> Any:
    """Build the scorer ``name`` names; ``kwargs`` go to its constructor."""
    return scorer_entry(name).build(**kwargs)


def _equal_rates(checkpoints: int) -> dict[str, Any]:
    return {"learning_rates": [1.0] * checkpoints}


for _entry in (
    ScorerEntry("trak", "tda.scorers.trak_variants:trak_scorer"),
    ScorerEntry("tracin", "tda.scorers.tracin:TracInCPScorer", defaults=_equal_rates),
    ScorerEntry("graddot", "tda.scorers.tracin:GradDotScorer"),
    ScorerEntry("gradcos", "tda.scorers.tracin:GradCosScorer"),
    ScorerEntry("repsim", "tda.scorers.repsim:RepSimScorer", features="representations"),
    ScorerEntry("airrep", "tda.scorers.airrep.scorer:AirRepScorer", features="representations"),
    ScorerEntry("ekfac", "tda.scorers.ekfac.scorer:EKFACScorer", features="preconditioned"),
    ScorerEntry("magic", "tda.scorers.magic.precomputed:PrecomputedScorer", features="metagradients"),
):
    register_scorer(_entry)

__all__ = ["FEATURES", "ScorerEntry", "make_scorer", "register_scorer", "scorer_entry", "scorer_names",
           "unregister_scorer"]
