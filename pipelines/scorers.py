"""The scorer registry: ``score.scorer`` name -> options, the feature kinds it scores, a builder.

Every scorer is two transforms and an inner product (:mod:`tda.scorers`); what differs between
them here is which stored features they read and how they are built from a run:

=================== =================================== ==========================================
name                feature kinds (preferred first)     built from
=================== =================================== ==========================================
trak                gradients, grid                     ``score.lambda_rel``, ``score.options``
                                                        (``normalize``, ``q_weight``)
dtrak               grid                                ``score.lambda_rel`` (D-TRAK: Q = 1)
tracin              slots, gradients                    the checkpoints' learning rates
graddot, gradcos    slots, gradients                    nothing
diffusion-tracin    slots                               learning rates, slot width
diffusion-retrac    slots                               learning rates, slot width
repsim              representations                     ``score.options`` (metric)
airrep              representations                     ``score.options`` and retrained subsets
ekfac               gradients (factored; query side       the run's checkpoints and training set
                    preconditioned, pipelines/ekfac.py)
magic               gradients (unused)                  the family's replayable recipe (model 0)
=================== =================================== ==========================================

A family declares the kinds it produces (``Family.feature_kinds``); the run uses the first kind
of the scorer's list that the family produces, and a scorer none of whose kinds the family
produces is a config error. ``slots`` are per-draw features (diffusion): the generic gradient
scorers then run per slot (:class:`tda.scorers.SlotScorer`). Adding a scorer is one
:func:`register_scorer` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tda.errors import ConfigError
from tda.scorers import RepSimScorer, make_scorer
from tda.scorers.diffusion import DiffusionReTracScorer, DiffusionTracInScorer, SlotScorer, make_dtrak_scorer

from .families import family_for
from .families.base import Family, projection_width
from .score_options import OPTION_TYPES, score_options

if TYPE_CHECKING:
    from .layout import RunPaths
    from .schema import RunConfig

Builder = Callable[["RunConfig", "RunPaths | None", Family, str], Any]


@dataclass(frozen=True)
class ScorerEntry:
    """One registered scorer: its feature kinds (preferred first), builder and options type."""

    name: str
    kinds: tuple[str, ...]
    build: Builder
    options: type | None = None


SCORERS: dict[str, ScorerEntry] = {}


def register_scorer(name: str, kinds: tuple[str, ...], build: Builder, replace: bool = False) -> ScorerEntry:
    """Make ``score.scorer: <name>`` available; ``build(cfg, paths, family, kind)`` returns the scorer."""
    if name in SCORERS and not replace:
        raise ConfigError(f"scorer {name!r} is already registered; pass replace=True")
    SCORERS[name] = ScorerEntry(name, tuple(kinds), build, OPTION_TYPES.get(name))
    return SCORERS[name]


def scorer_entry(name: str) -> ScorerEntry:
    if name not in SCORERS:
        raise ConfigError(f"score.scorer is {name!r}; choose one of {tuple(SCORERS)}")
    return SCORERS[name]


def feature_kind(cfg: RunConfig, family: Family | None = None) -> str:
    """The kind of features the run stores: the scorer's first kind the family produces."""
    family = family or family_for(cfg)
    entry = scorer_entry(cfg.score.scorer)
    for kind in entry.kinds:
        if kind in family.feature_kinds:
            return kind
    usable = [n for n, e in SCORERS.items() if set(e.kinds) & set(family.feature_kinds)]
    raise ConfigError(f"score.scorer {cfg.score.scorer!r} scores {' or '.join(entry.kinds)} features, which the "
                      f"{family.name!r} family does not produce; choose one of {usable}")


def check_scorer(cfg: RunConfig, family: Family) -> None:
    """Raise :class:`ConfigError` unless the family can feed the scorer and its options parse."""
    feature_kind(cfg, family)
    score_options(cfg, family)


def build_scorer(cfg: RunConfig, paths: RunPaths | None = None) -> Any:
    """The (unfitted) scorer ``score.scorer`` names, for the run's family and feature kind."""
    family = family_for(cfg)
    return scorer_entry(cfg.score.scorer).build(cfg, paths, family, feature_kind(cfg, family))


def _per_slot(cfg: RunConfig, family: Family, kind: str, scorer: Any) -> Any:
    return SlotScorer(scorer, projection_width(cfg, family.build_model(cfg))) if kind == "slots" else scorer


def _airrep(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from .airrep import airrep_scorer

    return airrep_scorer(cfg, paths)


def _diffusion(cls: type) -> Builder:
    return lambda cfg, paths, family, kind: cls(family.learning_rates(cfg, paths),
                                                projection_width(cfg, family.build_model(cfg)))


def _trak(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    """TRAK; with ``score.options`` (``normalize`` / ``q_weight``) its variant scorer."""
    from tda.scorers.trak_variants import TRAKVariantScorer

    options = score_options(cfg, family).scorer_options()
    if options:
        return TRAKVariantScorer(lambda_rel=cfg.score.lambda_rel, **options)
    return make_scorer("trak", lambda_rel=cfg.score.lambda_rel)


register_scorer("trak", ("gradients", "grid"), _trak)
register_scorer("dtrak", ("grid",), lambda cfg, paths, family, kind: make_dtrak_scorer(cfg.score.lambda_rel))
register_scorer("tracin", ("slots", "gradients"), lambda cfg, paths, family, kind: _per_slot(
    cfg, family, kind, make_scorer("tracin", learning_rates=family.learning_rates(cfg, paths))))
for _name in ("graddot", "gradcos"):
    register_scorer(_name, ("slots", "gradients"), lambda cfg, paths, family, kind, _n=_name: _per_slot(
        cfg, family, kind, make_scorer(_n)))
register_scorer("diffusion-tracin", ("slots",), _diffusion(DiffusionTracInScorer))
register_scorer("diffusion-retrac", ("slots",), _diffusion(DiffusionReTracScorer))
register_scorer("repsim", ("representations",), lambda cfg, paths, family, kind: RepSimScorer(
    score_options(cfg, family).metric))
register_scorer("airrep", ("representations",), _airrep)


def _magic(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from .magic import magic_scorer

    return magic_scorer(cfg, paths, family, kind)


register_scorer("magic", ("gradients",), _magic)


def _ekfac(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from tda.scorers import EKFACScorer

    from .ekfac import check_ekfac

    check_ekfac(cfg)
    return EKFACScorer()


register_scorer("ekfac", ("gradients",), _ekfac)
