"""The stages of a run, in order: train -> featurize -> retrain -> index -> score (-> validate).

Each stage reads its inputs from the run folder, writes outputs atomically and records
completion, so a rerun skips finished work: training per model, featurization per
(checkpoint, shard), retrainings per subset, the index and scores per configuration
fingerprint. ``validate`` (counterfactual retraining, slow) runs only when asked for.
"""

from __future__ import annotations

from .featurize import FeaturizeJob, open_store, stage_featurize  # noqa: F401
from .index import load_index, load_scorer, scorer_for, stage_index  # noqa: F401
from .retrain import stage_retrain  # noqa: F401
from .score import stage_score  # noqa: F401
from .train import stage_train  # noqa: F401

STAGES = ("train", "featurize", "retrain", "index", "score")
