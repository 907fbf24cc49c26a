"""The built-in methods (``score.scorer`` names) and how a run builds its scorer.

Every scorer is two transforms and an inner product (:mod:`tda.scorers`); what differs between
them here is which stored features they read, how they are built from a run, and the traits
the pipeline asks of them (:class:`pipelines.spec.method.Method`):

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
                    preconditioned, pipelines/methods/ekfac.py)
magic               gradients (unused)                  the family's replayable recipe (model 0)
=================== =================================== ==========================================

A family declares the kinds it produces (``Family.feature_kinds``); the run uses the first kind
of the scorer's list that the family produces, and a scorer none of whose kinds the family
produces is a config error. ``slots`` are per-draw features (diffusion): the generic gradient
scorers then run per slot (:class:`tda.scorers.SlotScorer`). Adding a scorer is one
:func:`pipelines.spec.method.register_method` call. This module imports neither torch nor the
families at import time: the torch-free query path reads the methods' traits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tda.errors import CheckpointError, ConfigError

from pipelines.spec.method import METHODS, Builder, Method, method_for, register_method

if TYPE_CHECKING:
    from pipelines.families.base import Family
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

#: every registered method by name (the registry of :mod:`pipelines.spec.method`)
SCORERS = METHODS


def feature_kind(cfg: RunConfig, family: Family | None = None) -> str:
    """The kind of features the run stores: the scorer's first kind the family produces."""
    from pipelines.families import family_for

    family = family or family_for(cfg)
    method = method_for(cfg.score.scorer)
    for kind in method.kinds:
        if kind in family.feature_kinds:
            return kind
    usable = [n for n, m in METHODS.items() if set(m.kinds) & set(family.feature_kinds)]
    raise ConfigError(f"score.scorer {cfg.score.scorer!r} scores {' or '.join(method.kinds)} features, which the "
                      f"{family.name!r} family does not produce; choose one of {usable}")


def check_scorer(cfg: RunConfig, family: Family) -> None:
    """Raise :class:`ConfigError` unless the family can feed the scorer and its options parse."""
    from pipelines.spec.options import score_options

    feature_kind(cfg, family)
    score_options(cfg, family)


def build_scorer(cfg: RunConfig, paths: RunPaths | None = None) -> Any:
    """The (unfitted) scorer ``score.scorer`` names, for the run's family and feature kind."""
    from pipelines.families import family_for

    family = family_for(cfg)
    return method_for(cfg.score.scorer).build(cfg, paths, family, feature_kind(cfg, family))


def _per_slot(cfg: RunConfig, family: Family, kind: str, scorer: Any) -> Any:
    from tda.scorers import SlotScorer

    from pipelines.families.base import projection_width

    return SlotScorer(scorer, projection_width(cfg, family.build_model(cfg))) if kind == "slots" else scorer


def _trak_scorer(cfg: RunConfig) -> Any:
    """TRAK as the run's ``score.options`` configure it (``normalize`` / ``q_weight``: its variant;
    the rule of :func:`tda.scorers.trak_variants.trak_scorer`, the Python API's too)."""
    from tda.scorers.trak_variants import VARIANT_KEYS, trak_scorer

    options = {key: cfg.score.options[key] for key in VARIANT_KEYS if key in cfg.score.options}
    return trak_scorer(lambda_rel=cfg.score.lambda_rel, **options)


def _trak(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    """TRAK; with ``score.options`` (``normalize`` / ``q_weight``) its variant scorer."""
    from pipelines.spec.options import score_options

    score_options(cfg, family)  # the options checked (a typo or a non-boolean is a ConfigError)
    return _trak_scorer(cfg)


def _dtrak(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from tda.scorers.diffusion import make_dtrak_scorer

    return make_dtrak_scorer(cfg.score.lambda_rel)


def _tracin(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from tda.scorers import make_scorer

    return _per_slot(cfg, family, kind, make_scorer("tracin", learning_rates=family.learning_rates(cfg, paths)))


def _plain(name: str) -> Builder:
    """A gradient scorer built from nothing (Grad-Dot, Grad-Cos), per slot on slot features."""
    def build(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
        from tda.scorers import make_scorer

        return _per_slot(cfg, family, kind, make_scorer(name))
    return build


def _diffusion(cls_name: str) -> Builder:
    def build(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
        from tda.scorers import diffusion

        from pipelines.families.base import projection_width

        return getattr(diffusion, cls_name)(family.learning_rates(cfg, paths),
                                            projection_width(cfg, family.build_model(cfg)))
    return build


def _repsim(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from tda.scorers import RepSimScorer

    from pipelines.spec.options import score_options

    return RepSimScorer(score_options(cfg, family).metric)


def _airrep(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from pipelines.methods.airrep import airrep_scorer

    return airrep_scorer(cfg, paths)


def _airrep_retrain(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> int:
    from pipelines.methods.airrep import airrep_retrain

    gt, _, _, _ = airrep_retrain(cfg, paths, progress)
    return gt.spec.n_subsets


def _magic(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from pipelines.methods.magic import magic_scorer

    return magic_scorer(cfg, paths, family, kind)


def _ekfac(cfg: RunConfig, paths: RunPaths | None, family: Family, kind: str) -> Any:
    from tda.scorers import EKFACScorer

    from pipelines.methods.ekfac import check_ekfac

    check_ekfac(cfg)
    return EKFACScorer()


def _ekfac_queries(cfg: RunConfig, paths: RunPaths | None, train_fingerprint: str) -> Any:
    from pipelines.methods.ekfac import ekfac_query_featurizer

    return ekfac_query_featurizer(cfg, paths, train_fingerprint)


def _lean_trak(cfg: RunConfig, state: dict[str, Any]) -> Any:
    return _trak_scorer(cfg).load_state_dict(state)


def _lean_tracin(cfg: RunConfig, state: dict[str, Any]) -> Any:
    from tda.scorers import TracInCPScorer

    if "learning_rates" not in state:
        raise CheckpointError("the TracIn state records no learning rates")
    return TracInCPScorer([float(x) for x in state["learning_rates"]]).load_state_dict(state)


def _lean_plain(cls_name: str) -> Any:
    def lean(cfg: RunConfig, state: dict[str, Any]) -> Any:
        import tda.scorers

        return getattr(tda.scorers, cls_name)().load_state_dict(state)
    return lean


_OPTIONS = "pipelines.spec.options:"
_SLOTS_FIRST = ("slots", "gradients")
register_method(Method("trak", ("gradients", "grid"), _trak, options=_OPTIONS + "TRAKOptions", self_influence=True,
                       lean=_lean_trak, tuned_ridge=True))
register_method(Method("dtrak", ("grid",), _dtrak))
register_method(Method("tracin", _SLOTS_FIRST, _tracin, self_influence=True, lean=_lean_tracin))
register_method(Method("graddot", _SLOTS_FIRST, _plain("graddot"), self_influence=True,
                       lean=_lean_plain("GradDotScorer")))
register_method(Method("gradcos", _SLOTS_FIRST, _plain("gradcos"), lean=_lean_plain("GradCosScorer")))
register_method(Method("diffusion-tracin", ("slots",), _diffusion("DiffusionTracInScorer")))
register_method(Method("diffusion-retrac", ("slots",), _diffusion("DiffusionReTracScorer")))
register_method(Method("repsim", ("representations",), _repsim, options=_OPTIONS + "RepSimOptions",
                       title="RepSim", similarity=True))
register_method(Method("airrep", ("representations",), _airrep, options=_OPTIONS + "AirRepOptions",
                       retrain=_airrep_retrain, validation="own-only"))
register_method(Method("magic", ("gradients",), _magic, validation="opt-in", linearity_check=True,
                       query_bound=True))
register_method(Method("ekfac", ("gradients",), _ekfac, query_featurizer=_ekfac_queries, self_influence=True))
