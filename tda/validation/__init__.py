"""Counterfactual validation: LDS, removal curves, brittleness, score noise, folds."""

from .metrics import (LDSResult, NoiseReport, bootstrap_ci, brittleness, group_predictions, lds,
                      removal_sets, score_noise, spearman_columns, split_folds)
from .subsets import sample_subsets

__all__ = ["LDSResult", "NoiseReport", "bootstrap_ci", "brittleness", "group_predictions", "lds",
           "removal_sets", "sample_subsets", "score_noise", "spearman_columns", "split_folds"]
