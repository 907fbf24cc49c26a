"""Scorers: each defines two transforms whose inner product is the attribution score."""

from .airrep import AirRepScorer
from .base import Scorer
from .ekfac import EKFACScorer
from .magic import PrecomputedScorer
from .repsim import RepSimScorer
from .tracin import GradCosScorer, GradDotScorer, TracInCPScorer
from .trak import DEFAULT_LAMBDA_REL, TRAKScorer

__all__ = ["Scorer", "TRAKScorer", "DEFAULT_LAMBDA_REL", "make_scorer", "TracInCPScorer",
           "GradDotScorer", "GradCosScorer", "RepSimScorer", "AirRepScorer", "EKFACScorer", "PrecomputedScorer"]


def make_scorer(name: str, **kwargs: object) -> Scorer:
    """Build a scorer by name (``"trak"``, ``"tracin"``, ``"graddot"``, ``"gradcos"``,
    ``"repsim"``, ``"airrep"``, ``"ekfac"``); ``kwargs`` go to its constructor."""
    from ..errors import ConfigError

    registry = {"trak": TRAKScorer, "tracin": TracInCPScorer, "graddot": GradDotScorer,
                "gradcos": GradCosScorer, "repsim": RepSimScorer, "airrep": AirRepScorer, "ekfac": EKFACScorer}
    if name not in registry:
        raise ConfigError(f"unknown scorer {name!r}; choose one of {sorted(registry)}")
    return registry[name](**kwargs)

from .diffusion import (DiffusionReTracScorer, DiffusionTracInScorer, SlotScorer, generally_influential,  # noqa: E402
                        influence_counts, make_dtrak_scorer)

__all__ += ["DiffusionTracInScorer", "DiffusionReTracScorer", "SlotScorer", "make_dtrak_scorer",
            "generally_influential", "influence_counts"]
