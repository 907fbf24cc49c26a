"""Which scorers ``tda validate`` measures, and their dense scores from the run's stored features.

Every registered scorer that reads the kind of features the run stored is measured on the same
ground truth: on gradients TRAK, TracInCP, Grad-Dot and Grad-Cos; on a diffusion run's per-draw
slots the generic gradient scorers and Diffusion-TracIn / Diffusion-ReTrac; on grid features TRAK
and D-TRAK; on representations RepSim. The run's own scorer is scored from its fitted state in
the run folder (that is how AirRep, which needs its retrain stage, is measured); the others are
fitted here. MAGIC is measured when it is the run's scorer or named. ``validate.scorers`` picks
a subset.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from stores import FeatureStore
from tda.errors import ConfigError
from tda.core.features import FeatureBlock
from tda.core.kernel import score_matrix

from pipelines.layout import RunPaths
from pipelines.spec.schema import RunConfig
from pipelines.spec.method import methods
from pipelines.methods.scorers import build_scorer, feature_kind
from pipelines.stages.index import load_scorer


def as_scorer(cfg: RunConfig, name: str) -> RunConfig:
    """The run's config with ``score.scorer = name`` (options kept only for the run's own scorer)."""
    if name == cfg.score.scorer:
        return cfg
    return replace(cfg, score=replace(cfg.score, scorer=name, options={}))


def _fingerprints(cfg: RunConfig) -> dict[str, str]:
    from pipelines.run import feature_fingerprint

    return {split: feature_fingerprint(cfg, split) for split in ("train", "query")}


def _reads(cfg: RunConfig, name: str, own: dict[str, str]) -> bool:
    """Whether ``name`` scores exactly the features the run stored (``own``: their fingerprints),
    both splits (same kind, same fingerprints: RepSim does not read AirRep's label-aware
    representations, nor TRAK EK-FAC's preconditioned queries)."""
    try:
        return _fingerprints(as_scorer(cfg, name)) == own
    except ConfigError:
        return False


def usable_scorers(cfg: RunConfig) -> list[str]:
    """The run's own scorer, then every registered one (but those measured only as the run's own,
    ``validation="own-only"``: they need stages of their own before they can score) that reads
    exactly the run's stored features."""
    own = _fingerprints(cfg)
    return [cfg.score.scorer] + [n for n, m in methods().items() if n != cfg.score.scorer
                                 and m.validation != "own-only" and _reads(cfg, n, own)]


def validation_scorers(cfg: RunConfig) -> list[str]:
    """The scorers to measure, the run's own first; a named scorer that cannot read the run's
    features is a :class:`ConfigError` naming the ones that can."""
    kind, usable = feature_kind(cfg), usable_scorers(cfg)
    wanted = cfg.validate.scorers
    if wanted is None:
        # opt-in methods are measured when they are the run's own or named in validate.scorers
        return [n for n in usable if n == cfg.score.scorer or methods()[n].validation != "opt-in"]
    bad = [n for n in wanted if n not in usable]
    if bad:
        raise ConfigError(f"validate.scorers names {bad}, which cannot score this run's {kind!r} features; choose "
                          f"from {usable}")
    return [n for n in usable if n in wanted]


def scorer_for(cfg: RunConfig, paths: RunPaths, name: str, train: FeatureStore) -> Any:
    """The fitted scorer ``name``: the run's own from its saved state, any other fitted on ``train``."""
    if name == cfg.score.scorer:
        return load_scorer(cfg, paths)
    return build_scorer(as_scorer(cfg, name), paths).fit(train)


def scores_for(cfg: RunConfig, paths: RunPaths, name: str, train: FeatureStore, query: FeatureBlock) -> np.ndarray:
    """Dense (m, n) scores of ``name`` on the validated queries."""
    return score_matrix(query, scorer_for(cfg, paths, name, train), train)
