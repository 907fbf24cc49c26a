"""Counterfactual validation metrics (docs/methods.md section 6), as pure functions.

Shapes: m queries, n training examples, J subsets, R retrained models per subset.
Sign: ``scores[q, i] > 0`` means training on i raises f(z_q); the group prediction of subset
S_j is ``g_j(z_q) = sum_{i in S_j} scores[q, i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from tda.errors import ShapeError


@dataclass
class LDSResult:
    """LDS per query and its summary.

    Attributes:
        per_query: (m,) Spearman correlation per query, NaN where undefined.
        mean: mean over defined queries.
        ci_low, ci_high: bootstrap percentile interval of the mean (over queries).
        n_undefined: queries whose predictions or outputs are constant across subsets.
    """

    per_query: np.ndarray
    mean: float
    ci_low: float
    ci_high: float
    n_undefined: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "n_undefined": self.n_undefined, "n_queries": int(len(self.per_query))}


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching columns of a and b (J, m) -> (m,), average ranks for ties.

    NaN where a column is constant (the correlation is undefined).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ShapeError(f"spearman needs two (J, m) arrays of one shape, got {a.shape} and {b.shape}")
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denom = np.sqrt((ra ** 2).sum(axis=0) * (rb ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=0) / denom
    rho[denom == 0] = np.nan
    return rho


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def group_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``g[j, q] = sum_{i in S_j} scores[q, i]``: (m, n), (J, n) bool -> (J, m)."""
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ShapeError(f"scores (m, n) and masks (J, n) must share n, got {scores.shape} and {masks.shape}")
    return masks.astype(np.float64) @ scores.astype(np.float64).T


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, n_boot: int = 2000,
        seed: int = 0) -> LDSResult:
    """Linear datamodeling score.

    Args:
        scores: (m, n) attribution scores.
        masks: (J, n) bool, True where example i was in training subset j.
        outputs: (J, m) measured f(z_q) of models trained on subset j (averaged over R seeds).

    Returns:
        :class:`LDSResult` (Spearman over subsets per query; mean with bootstrap interval).
    """
    preds = group_predictions(scores, masks)
    if outputs.shape != preds.shape:
        raise ShapeError(f"outputs must be (J, m) = {preds.shape}, got {outputs.shape}")
    per_query = spearman_columns(preds, np.asarray(outputs, dtype=np.float64))
    defined = np.isfinite(per_query)
    mean = float(per_query[defined].mean()) if defined.any() else float("nan")
    lo, hi = bootstrap_ci(per_query, n_boot=n_boot, seed=seed)
    return LDSResult(per_query, mean, lo, hi, int((~defined).sum()))


def removal_sets(scores_row: np.ndarray, k: int, mode: str, seed: int = 0) -> np.ndarray:
    """Indices of the k training examples to remove for one query: ``top``, ``bottom`` or ``random``."""
    n = scores_row.shape[0]
    if not 0 <= k <= n:
        raise ShapeError(f"cannot remove {k} of {n} training examples")
    if mode == "top":
        return np.argsort(-scores_row, kind="stable")[:k]
    if mode == "bottom":
        return np.argsort(scores_row, kind="stable")[:k]
    if mode == "random":
        return np.random.default_rng(seed).choice(n, size=k, replace=False)
    raise ShapeError(f"removal mode {mode!r} is unknown; use top, bottom or random")


def brittleness(flipped: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Smallest k whose removal flips the prediction, per query; -1 where none does.

    Args:
        flipped: (m, len(ks)) bool, True where removing the top-k flipped query q.
        ks: (len(ks),) increasing removal sizes.
    """
    flipped = np.asarray(flipped, dtype=bool)
    first = np.where(flipped.any(axis=1), np.argmax(flipped, axis=1), -1)
    return np.where(first >= 0, np.asarray(ks)[np.maximum(first, 0)], -1)


@dataclass
class NoiseReport:
    """Per-pair signal to noise of scores over R independently trained models."""

    mean: np.ndarray  # (m, n)
    std: np.ndarray  # (m, n)
    snr: np.ndarray  # (m, n) |mean| / std
    share_distinguishable: float  # share of pairs whose mean is > 2 standard errors from 0

    def as_dict(self) -> dict:
        return {"share_distinguishable": self.share_distinguishable,
                "median_snr": float(np.nanmedian(self.snr)), "mean_std": float(self.std.mean())}


def score_noise(stack: np.ndarray) -> NoiseReport:
    """Noise of attribution scores computed on R independently trained models: (R, m, n)."""
    if stack.ndim != 3 or stack.shape[0] < 2:
        raise ShapeError(f"noise needs scores of >= 2 models as (R, m, n), got {stack.shape}")
    mean = stack.mean(axis=0)
    std = stack.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(mean) / std
        stderr = std / np.sqrt(stack.shape[0])
    share = float((np.abs(mean) > 2 * stderr).mean())
    return NoiseReport(mean, std, snr, share)


@dataclass
class Reliability:
    """How much of the ground truth's spread over subsets is signal rather than retraining noise.

    Attributes:
        single: (m,) mean Spearman over subsets between two models of one subset (different seeds).
        reliability: (m,) Spearman-Brown reliability of the mean of R models, ``R r / (1 + (R-1) r)``.
        ceiling: mean over queries of ``sqrt(reliability)``, about the highest LDS any attribution
            can reach against this ground truth (a predictor of the expected output correlates
            with the R-model mean at most this much).
    """

    single: np.ndarray
    reliability: np.ndarray
    ceiling: float

    def as_dict(self) -> dict:
        return {"single_model_agreement": float(np.nanmean(self.single)),
                "reliability": float(np.nanmean(self.reliability)), "lds_ceiling": self.ceiling}


def ground_truth_reliability(outputs: np.ndarray) -> Reliability:
    """Noise ceiling of LDS from ground truth with R >= 2 models per subset: outputs (J, R, m)."""
    if outputs.ndim != 3 or outputs.shape[1] < 2:
        raise ShapeError(f"reliability needs >= 2 models per subset as (J, R, m), got {outputs.shape}; "
                         "set validate.models_per_subset >= 2")
    r_count = outputs.shape[1]
    pairs = [spearman_columns(outputs[:, a], outputs[:, b]) for a in range(r_count) for b in range(a + 1, r_count)]
    single = np.nanmean(np.stack(pairs), axis=0)
    pos = np.clip(single, 0.0, None)
    rel = r_count * pos / (1 + (r_count - 1) * pos)
    return Reliability(single, rel, float(np.nanmean(np.sqrt(rel))))


def split_folds(n_queries: int, n_subsets: int, tune_fraction: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint tuning and reporting folds over queries and over subsets.

    Hyperparameters are chosen on (tune queries, tune subsets) and figures reported on
    (report queries, report subsets), so nothing reported was seen while tuning.
    """
    if not 0 < tune_fraction < 1:
        raise ShapeError(f"tune_fraction must be in (0, 1), got {tune_fraction}")
    rng = np.random.default_rng(seed)
    q = rng.permutation(n_queries)
    j = rng.permutation(n_subsets)
    nq, nj = int(round(n_queries * tune_fraction)), int(round(n_subsets * tune_fraction))
    if min(nq, n_queries - nq, nj, n_subsets - nj) < 1:
        raise ShapeError(f"{n_queries} queries / {n_subsets} subsets are too few to split into two folds")
    return {"tune_queries": np.sort(q[:nq]), "report_queries": np.sort(q[nq:]),
            "tune_subsets": np.sort(j[:nj]), "report_subsets": np.sort(j[nj:])}
