"""Scorers: each defines two transforms whose inner product is the attribution score.

Names are imported lazily (PEP 562), so ``tda.scorers.base`` or ``tda.scorers.trak`` can be read
without importing every scorer (AirRep's head needs torch; the transforms of TRAK, TracIn,
Grad-Dot / Grad-Cos and RepSim are numpy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tda.lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "AirRepScorer": "airrep.scorer", "Scorer": "base", "EKFACScorer": "ekfac.scorer", "PrecomputedScorer": "magic.precomputed",
    "RepSimScorer": "repsim", "GradCosScorer": "tracin", "GradDotScorer": "tracin", "TracInCPScorer": "tracin",
    "DEFAULT_LAMBDA_REL": "trak", "TRAKScorer": "trak", "DiffusionTracInScorer": "diffusion",
    "DiffusionReTracScorer": "diffusion", "SlotScorer": "diffusion", "make_dtrak_scorer": "diffusion",
    "generally_influential": "diffusion", "influence_counts": "diffusion",
    "ScorerEntry": "registry", "make_scorer": "registry", "register_scorer": "registry",
    "scorer_entry": "registry", "scorer_names": "registry",
}

__all__ = [*_EXPORTS]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from tda.scorers.airrep.scorer import AirRepScorer
    from tda.scorers.base import Scorer
    from tda.scorers.diffusion import (DiffusionReTracScorer, DiffusionTracInScorer, SlotScorer, generally_influential,
                            influence_counts, make_dtrak_scorer)
    from tda.scorers.ekfac.scorer import EKFACScorer
    from tda.scorers.magic.precomputed import PrecomputedScorer
    from tda.scorers.repsim import RepSimScorer
    from tda.scorers.tracin import GradCosScorer, GradDotScorer, TracInCPScorer
    from tda.scorers.registry import ScorerEntry, make_scorer, register_scorer, scorer_entry, scorer_names
    from tda.scorers.trak import DEFAULT_LAMBDA_REL, TRAKScorer
