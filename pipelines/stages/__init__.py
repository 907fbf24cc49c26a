"""The stages of a run, in order: train -> featurize -> retrain -> index -> score (-> validate).

Each stage reads its inputs from the run folder, writes outputs atomically and records
completion, so a rerun skips finished work: training per model, featurization per
(checkpoint, shard), retrainings per subset, the index and scores per configuration
fingerprint. ``validate`` (counterfactual retraining, slow) runs only when asked for.

:data:`STAGE_TABLE` declares each stage once; the order, ``tda run``'s ``--from``/``--only``
choices, what ``--from`` deletes and the run's summary lines all derive from it. The stage
functions are imported on first use (PEP 562), so reading the table (the CLI's parser) loads no
model code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from tda.errors import ConfigError
from tda.lazy import lazy_exports

from pipelines.layout import LABELS_DIR

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig


@dataclass(frozen=True)
class Stage:
    """One stage of ``tda run``."""

    name: str
    #: the submodule of :mod:`pipelines.stages` that defines the stage function (imported when it runs)
    module: str
    #: the stage function, ``function(cfg, paths, progress)``
    function: str
    #: what it makes in the run folder: ``tda run --from`` deletes these for the named stage and every
    #: later one, so they are redone (derived data only: checkpoints named by model.checkpoints and
    #: shared retraining folders are never touched; validation/ resumes its retrainings)
    outputs: tuple[str, ...]
    #: the function of :mod:`pipelines.stages.summary` that runs the stage and returns its line of
    #: ``tda run``'s summary
    summary: str
    #: part of the default ``tda run``; ``validate`` (retrainings, slow) runs only when named
    default: bool = True

    def load(self) -> Callable[..., Any]:
        """The stage function (its module imported now)."""
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.function)

    def run(self, cfg: RunConfig, paths: RunPaths, progress: bool) -> str:
        """Run the stage; the line it adds to ``tda run``'s summary."""
        summary = getattr(importlib.import_module(f"{__name__}.summary"), self.summary)
        return summary(cfg, paths, partial(self.load(), cfg, paths, progress))


#: every stage, in the order ``tda run`` runs them
STAGE_TABLE = (
    Stage("train", "train", "stage_train", ("checkpoints",), "train_line"),
    Stage("featurize", "featurize", "stage_featurize", ("features-train", "features-query"), "featurize_line"),
    Stage("retrain", "retrain", "stage_retrain", ("airrep",), "retrain_line"),
    Stage("index", "index", "stage_index", ("scorer", "index"), "index_line"),
    Stage("score", "score", "stage_score", ("scores", LABELS_DIR), "score_line"),
    Stage("validate", "validate", "stage_validate", (), "validate_line", default=False),
)
#: the default ``tda run``: up to ``score``
STAGES = tuple(s.name for s in STAGE_TABLE if s.default)
#: ``tda run`` stages: ``validate`` runs when named with ``--only validate`` or ``--from validate``
RUN_STAGES = tuple(s.name for s in STAGE_TABLE)
#: what each stage made in the run folder (see :attr:`Stage.outputs`)
STAGE_OUTPUTS = {s.name: s.outputs for s in STAGE_TABLE}


def stage_named(name: str) -> Stage:
    for stage in STAGE_TABLE:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; choose one of {RUN_STAGES}")


def selected(only: str | None, start: str | None) -> list[Stage]:
    """The stages ``tda run --only ONLY`` or ``--from START`` runs: ``only`` alone; else from ``start``
    (default the first) every later default stage (a stage run only when named runs when it is ``start``)."""
    if only:
        return [stage_named(only)]
    first = RUN_STAGES.index(stage_named(start).name) if start else 0
    return [s for s in STAGE_TABLE[first:] if s.default or s.name == start]


#: public name -> the stage module that defines it
_EXPORTS = {**{s.function: s.module for s in STAGE_TABLE}, "FeaturizeJob": "featurize", "open_store": "featurize",
            "load_index": "index", "load_scorer": "index", "scorer_for": "index"}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # the lazy names, for type checkers
    from pipelines.stages.featurize import FeaturizeJob, open_store, stage_featurize  # noqa: F401
    from pipelines.stages.index import load_index, load_scorer, scorer_for, stage_index  # noqa: F401
    from pipelines.stages.retrain import stage_retrain  # noqa: F401
    from pipelines.stages.score import stage_score  # noqa: F401
    from pipelines.stages.train import stage_train  # noqa: F401
    from pipelines.stages.validate import stage_validate  # noqa: F401
