"""Counterfactual validation: LDS, calibration, removal curves, brittleness, score noise, folds."""

from tda.validation.calibration import Calibration, calibration_report, fit_calibration, removal_effects
from tda.validation.linearity import Linearity, half_weight_linearity
from tda.validation.metrics import (LDSResult, NoiseReport, Reliability, bootstrap_ci, brittleness, ground_truth_reliability,
                      group_predictions, lds,
                      removal_sets, score_noise, spearman_columns, split_folds)
from tda.validation.subsets import sample_subsets

__all__ = ["Calibration", "LDSResult", "Linearity", "half_weight_linearity", "calibration_report", "fit_calibration", "removal_effects", "NoiseReport", "Reliability", "bootstrap_ci", "brittleness",
           "ground_truth_reliability", "group_predictions", "lds",
           "removal_sets", "sample_subsets", "score_noise", "spearman_columns", "split_folds"]
