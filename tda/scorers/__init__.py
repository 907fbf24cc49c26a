"""Scorers: each defines two transforms whose inner product is the attribution score.

Names are imported lazily (PEP 562), so ``tda.scorers.base`` or ``tda.scorers.trak`` can be read
without importing every scorer (AirRep's head needs torch; the transforms of TRAK, TracIn,
Grad-Dot / Grad-Cos and RepSim are numpy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tda.lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "AirRepScorer": "airrep.scorer", "Scorer": "base", "EKFACScorer": "ekfac.scorer", "PrecomputedScorer": "magic.precomputed",
    "RepSimScorer": "repsim", "GradCosScorer": "tracin", "GradDotScorer": "tracin", "TracInCPScorer": "tracin",
    "DEFAULT_LAMBDA_REL": "trak", "TRAKScorer": "trak", "DiffusionTracInScorer": "diffusion",
    "DiffusionReTracScorer": "diffusion", "SlotScorer": "diffusion", "make_dtrak_scorer": "diffusion",
    "generally_influential": "diffusion", "influence_counts": "diffusion",
}

#: ``make_scorer`` name -> class name (the Python API's names; ``tda run`` declares its methods,
#: with their traits, in pipelines/methods/scorers.py)
_REGISTRY = {"trak": "TRAKScorer", "tracin": "TracInCPScorer", "graddot": "GradDotScorer",
             "gradcos": "GradCosScorer", "repsim": "RepSimScorer", "airrep": "AirRepScorer", "ekfac": "EKFACScorer"}

__all__ = [*_EXPORTS, "make_scorer"]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def make_scorer(name: str, **kwargs: object) -> Any:
    """Build a scorer by name (``"trak"``, ``"tracin"``, ``"graddot"``, ``"gradcos"``,
    ``"repsim"``, ``"airrep"``, ``"ekfac"``); ``kwargs`` go to its constructor."""
    from tda.errors import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"unknown scorer {name!r}; choose one of {sorted(_REGISTRY)}")
    return __getattr__(_REGISTRY[name])(**kwargs)


if TYPE_CHECKING:
    from tda.scorers.airrep.scorer import AirRepScorer
    from tda.scorers.base import Scorer
    from tda.scorers.diffusion import (DiffusionReTracScorer, DiffusionTracInScorer, SlotScorer, generally_influential,
                            influence_counts, make_dtrak_scorer)
    from tda.scorers.ekfac.scorer import EKFACScorer
    from tda.scorers.magic.precomputed import PrecomputedScorer
    from tda.scorers.repsim import RepSimScorer
    from tda.scorers.tracin import GradCosScorer, GradDotScorer, TracInCPScorer
    from tda.scorers.trak import DEFAULT_LAMBDA_REL, TRAKScorer
