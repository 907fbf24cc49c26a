"""Is the retrained outcome linear in the dropped examples' weight? The half-weight check.

A first-order attribution (MAGIC's exact derivative, or any influence estimate) predicts the
effect of dropping a group of training examples as a sum of per-example slopes, so it can only
be right where the outcome changes linearly as the group's weight goes from 1 to 0. The check
retrains each of a few subsets twice with the same seed and batch order: once with the group at
weight 0 (the drop) and once at weight 0.5. Where the response is linear, twice the half-weight
change equals the full change (Pearson 1, slope 1); where training amplifies small changes
chaotically, the two are unrelated, and no first-order method can predict the drop.

Shapes: m queries, J subsets; changes are measured from the full-set reference run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tda.errors import ShapeError

#: Pearson and slope bounds within which the outcome counts as linear (the verdict's wording)
LINEAR_PEARSON = 0.9
LINEAR_SLOPE = (0.8, 1.25)


@dataclass
class Linearity:
    """Twice the half-weight change against the full change, pooled over subsets and queries.

    Attributes:
        pearson: Pearson correlation of ``2 (f_half - f_ref)`` and ``f_drop - f_ref``.
        slope: least-squares slope through the origin of the full change on twice the half change
            (1 when linear; below 1 when half the weight already gives more than half the change).
        half_ratio: ``sum(half * full) / sum(full^2)``: the share of the full change that half the
            weight gives, projected (0.5 when linear).
        pairs: (subset, query) pairs pooled.
        subsets: subsets retrained at half weight.
    """

    pearson: float
    slope: float
    half_ratio: float
    pairs: int
    subsets: int

    @property
    def linear(self) -> bool:
        lo, hi = LINEAR_SLOPE
        return bool(self.pearson >= LINEAR_PEARSON and lo <= self.slope <= hi)

    def verdict(self) -> str:
        """A plain sentence saying what the figures mean for a first-order attribution."""
        head = (f"half the weight change gives {self.half_ratio:.2f} of the drop's change (linear: 0.50), "
                f"Pearson {self.pearson:.2f} between twice it and the drop's change, slope {self.slope:.2f}")
        if self.linear:
            return (f"{head}: the retrained outputs respond linearly to these drops, so a first-order "
                    "attribution (MAGIC) can predict them.")
        return (f"{head}: the retrained outputs do NOT respond linearly to these drops (training amplifies "
                "small changes), so no first-order attribution, MAGIC included, can predict them well; "
                "read a low LDS as a property of the recipe, not of the scorer.")

    def as_dict(self) -> dict:
        return {"pearson": self.pearson, "slope": self.slope, "half_ratio": self.half_ratio, "pairs": self.pairs,
                "subsets": self.subsets, "linear": self.linear, "verdict": self.verdict()}


def half_weight_linearity(reference: np.ndarray, dropped: np.ndarray, half: np.ndarray) -> Linearity:
    """The half-weight linearity check.

    Args:
        reference: (m,) outputs of the full-set run (every weight 1).
        dropped: (J, m) outputs with each subset's dropped examples at weight 0.
        half: (J, m) outputs of the same subsets with the dropped examples at weight 0.5.

    Returns:
        :class:`Linearity`; NaN figures where the changes are all zero.
    """
    reference, dropped, half = (np.asarray(a, dtype=np.float64) for a in (reference, dropped, half))
    if dropped.ndim != 2 or half.shape != dropped.shape or reference.shape != dropped.shape[1:]:
        raise ShapeError(f"linearity check needs reference (m,), dropped and half (J, m) of one shape; got "
                         f"{reference.shape}, {dropped.shape}, {half.shape}")
    full = (dropped - reference).ravel()
    twice = 2.0 * (half - reference).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        sx, sf = float(twice @ twice), float(full @ full)
        slope = float(twice @ full) / sx if sx > 0 else float("nan")
        ratio = 0.5 * float(twice @ full) / sf if sf > 0 else float("nan")
        pearson = float(np.corrcoef(twice, full)[0, 1]) if twice.std() > 0 and full.std() > 0 else float("nan")
    return Linearity(pearson, slope, ratio, int(full.size), int(dropped.shape[0]))
