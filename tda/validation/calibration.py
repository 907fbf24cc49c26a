"""Magnitude calibration of attributed group effects (docs/methods.md section 6).

LDS checks ranks only. The unlearning workflow also needs the size of an effect. Removing the
group ``D \\ S_j`` changes the output by ``actual[j, q] = f_{S_j}(z_q) - f_D(z_q)``. The scores
predict ``predicted[j, q] = -sum_{i not in S_j} scores[q, i]``.

The fit is ordinary least squares over every (subset, query) pair: ``actual = intercept + slope *
predicted``. ``slope = 1`` and ``intercept = 0`` mean the raw scores are calibrated. The fit is
made on one fold and judged on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tda.errors import ShapeError


@dataclass
class Calibration:
    """``actual ~ intercept + slope * predicted`` for removals of ``group_size`` examples.

    Attributes:
        slope, intercept: the least-squares line.
        slope_ci: bootstrap percentile interval of the slope, resampling queries.
        r: Pearson correlation of predicted and actual changes over all pairs.
        n_pairs: (subset, query) pairs in the fit.
        group_size: examples removed per subset (the line holds for groups of about this size).
    """

    slope: float
    intercept: float
    slope_ci: tuple[float, float]
    r: float
    n_pairs: int
    group_size: int

    def predict(self, raw: np.ndarray | float) -> np.ndarray | float:
        """The calibrated predicted change for raw predicted changes."""
        return self.intercept + self.slope * np.asarray(raw, dtype=np.float64)

    def as_dict(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "slope_ci": list(self.slope_ci), "r": self.r,
                "n_pairs": self.n_pairs, "group_size": self.group_size}


def removal_effects(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted change from removing each subset's complement: ``-sum_{i not in S_j} scores[q, i]``, (J, m)."""
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ShapeError(f"scores (m, n) and masks (J, n) must share n, got {scores.shape} and {masks.shape}")
    return -((~masks.astype(bool)).astype(np.float64) @ scores.astype(np.float64).T)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    xc = x - x.mean()
    var = float((xc ** 2).sum())
    if var == 0.0:
        return float("nan"), float(y.mean())
    slope = float((xc * (y - y.mean())).sum() / var)
    return slope, float(y.mean() - slope * x.mean())


def fit_calibration(predicted: np.ndarray, actual: np.ndarray, group_size: int, n_boot: int = 1000,
                    seed: int = 0) -> Calibration:
    """Least-squares calibration line over (J, m) pairs, with a bootstrap over the m queries."""
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ShapeError(f"predicted and actual changes must be (J, m) arrays of one shape, got {predicted.shape} "
                         f"and {actual.shape}")
    slope, intercept = _line(predicted.ravel(), actual.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = float(np.corrcoef(predicted.ravel(), actual.ravel())[0, 1]) if predicted.size > 1 else float("nan")
    rng = np.random.default_rng(seed)
    m = predicted.shape[1]
    boots = []
    for _ in range(n_boot if m > 1 else 0):
        cols = rng.integers(0, m, size=m)
        boots.append(_line(predicted[:, cols].ravel(), actual[:, cols].ravel())[0])
    boots_arr = np.asarray([b for b in boots if np.isfinite(b)])
    ci = (float(np.quantile(boots_arr, 0.025)), float(np.quantile(boots_arr, 0.975))) if len(boots_arr) else \
        (float("nan"), float("nan"))
    return Calibration(slope, intercept, ci, r, int(predicted.size), int(group_size))


def calibration_report(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, full: np.ndarray,
                       folds: dict[str, np.ndarray]) -> dict:
    """Fit on the tuning fold, judge on the reporting fold.

    Args:
        scores: (m, n). masks: (J, n) bool. outputs: (J, m) retrained outputs. full: (m,)
            outputs of models trained on everything.
        folds: :func:`~tda.validation.split_folds` output.

    Returns:
        ``{"fit": Calibration.as_dict() (tuning fold), "report": {...}}``. The report holds the mean
        absolute error of the raw and calibrated predictions, and the report fold's own slope.
    """
    predicted = removal_effects(scores, masks)
    actual = np.asarray(outputs, np.float64) - np.asarray(full, np.float64)[None, :]
    group = int(masks.shape[1] - masks.sum(axis=1).mean().round())
    tq, rq, tj, rj = (folds[k] for k in ("tune_queries", "report_queries", "tune_subsets", "report_subsets"))
    fit = fit_calibration(predicted[np.ix_(tj, tq)], actual[np.ix_(tj, tq)], group)
    p, a = predicted[np.ix_(rj, rq)], actual[np.ix_(rj, rq)]
    own = fit_calibration(p, a, group)
    report = {"fold": "report", "mae_raw": float(np.abs(p - a).mean()),
              "mae_calibrated": float(np.abs(fit.predict(p) - a).mean()),
              "mean_actual_change": float(a.mean()), "mean_predicted_change": float(p.mean()),
              "slope": own.slope, "slope_ci": list(own.slope_ci), "r": own.r}
    return {"fit": {"fold": "tune", **fit.as_dict()}, "report": report}
