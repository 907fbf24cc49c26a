"""The retrain stage: subset retrainings a scorer learns from, run before it is fitted.

A method that needs retraining (``Method.retrain``; AirRep, ``score.scorer: airrep``) learns its encoder from the outputs of models retrained on
random training subsets (:func:`pipelines.methods.airrep.airrep_retrain`: resumable, stored as they
finish, shareable through ``score.options.data_dir``). Other scorers need no retraining, and
the stage does nothing for them; the validator's own retrainings run in the validate stage.
"""

from __future__ import annotations

from pipelines.layout import RunPaths
from pipelines.spec.method import method_for
from pipelines.spec.schema import RunConfig


def stage_retrain(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> int:
    """Run or resume the scorer's subset retrainings; returns how many subsets it has (0: none needed)."""
    method = method_for(cfg.score.scorer)
    if not method.needs_retraining:
        return 0
    return method.retrain(cfg, paths, progress)
