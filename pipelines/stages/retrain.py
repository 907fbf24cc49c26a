"""The retrain stage: subset retrainings a scorer learns from, run before it is fitted.

AirRep (``score.scorer: airrep``) learns its encoder from the outputs of models retrained on
random training subsets (:func:`pipelines.airrep.airrep_retrain`: resumable, stored as they
finish, shareable through ``score.options.data_dir``). Other scorers need no retraining, and
the stage does nothing for them; the validator's own retrainings run in the validate stage.
"""

from __future__ import annotations

from ..airrep import airrep_retrain
from ..layout import RunPaths
from ..schema import RunConfig

#: Scorers that learn from retrained subsets.
RETRAINED_SCORERS = ("airrep",)


def stage_retrain(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> int:
    """Run or resume the scorer's subset retrainings; returns how many subsets it has (0: none needed)."""
    if cfg.score.scorer not in RETRAINED_SCORERS:
        return 0
    gt, _, _, _ = airrep_retrain(cfg, paths, progress)
    return gt.spec.n_subsets
