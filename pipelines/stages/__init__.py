"""The stages of a run, in order: train -> featurize -> retrain -> index -> score (-> validate).

Each stage reads its inputs from the run folder, writes outputs atomically and records
completion, so a rerun skips finished work: training per model, featurization per
(checkpoint, shard), retrainings per subset, the index and scores per configuration
fingerprint. ``validate`` (counterfactual retraining, slow) runs only when asked for.

The stage functions are imported on first use (PEP 562), so reading :data:`STAGES` (the CLI's
parser) loads no model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tda.lazy import lazy_exports

STAGES = ("train", "featurize", "retrain", "index", "score")
#: ``tda run`` stages: the default run stops after ``score``; ``validate`` (retrainings, slow)
#: runs when named with ``--only validate`` or ``--from validate``.
RUN_STAGES = (*STAGES, "validate")

#: public name -> the stage module that defines it
_EXPORTS = {"FeaturizeJob": "featurize", "open_store": "featurize", "stage_featurize": "featurize",
            "load_index": "index", "load_scorer": "index", "scorer_for": "index", "stage_index": "index",
            "stage_retrain": "retrain", "stage_score": "score", "stage_train": "train"}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:
    from .featurize import FeaturizeJob, open_store, stage_featurize  # noqa: F401
    from .index import load_index, load_scorer, scorer_for, stage_index  # noqa: F401
    from .retrain import stage_retrain  # noqa: F401
    from .score import stage_score  # noqa: F401
    from .train import stage_train  # noqa: F401
