"""The TracIn family as transforms (docs/methods.md section 4).

All three scorers are inner products of per-checkpoint features ``phi_c`` (the FeatureBlock's
M axis is the checkpoints), so each is a pair of concatenations over checkpoints:

- TracInCP: ``tau(z)_i = sum_c eta_c <phi_c(z), phi_c,i>``, with
  ``T_train(z_i) = concat_c(sqrt(eta_c) phi_c,i)`` and ``T_query(z) = concat_c(sqrt(eta_c) phi_c(z))``.
- Grad-Dot: ``tau(z)_i = (1/M) sum_c <phi_c(z), phi_c,i>`` (plain gradient dot products, the
  ``lambda -> infinity`` limit of TRAK up to scale), with ``T_train = concat_c(phi_c,i) / M``.
- Grad-Cos: ``tau(z)_i = (1/M) sum_c cos(phi_c(z), phi_c,i)``: the same with every row
  normalised to unit L2 norm per checkpoint first (zero rows stay zero).

Which gradients: the features are gradients of the task's *measured output* ``f`` (for
classification the margin ``log(p/(1-p))``, docs/methods.md section 1), not of the training loss.
With the margin this is the "output-gradient" TracIn variant: since
``dLoss/dtheta = -Q * df/dtheta`` with ``Q = 1 - p_y`` for cross-entropy, the loss-gradient
TracIn score of a pair equals this one times ``Q(z) * Q(z_i)`` per checkpoint. The loss weights
``q`` carried by the :class:`~tda.core.features.FeatureBlock` are ignored by these scorers. Random
projection (docs/methods.md section 2) preserves inner products in expectation, and the cosine of
projected gradients approximates the cosine of full gradients.

Sign convention: a positive score means the training example raises ``f(z)`` (a gradient step
on ``z_i`` moves ``f(z)`` by about ``eta <g(z), g(z_i)>``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tda.errors import ConfigError, NonFiniteError
from tda.core.features import FeatureBlock, FeatureSource
from tda.scorers.base import Scorer


def concat_checkpoints(feats: np.ndarray, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Join the checkpoints of a block side by side, checkpoint c scaled by ``weights[c]``.

    Args:
        feats: (M, b, k) features of b examples under M checkpoints (any float dtype).
        weights: (M,) per-checkpoint factors, ``None`` for ones.

    Returns:
        (b, M*k) float32: row i is ``concat_c(weights[c] * feats[c, i])``.
    """
    m_count, b, k = feats.shape
    out = np.asarray(feats, dtype=np.float32)
    if weights is not None:
        out = out * np.asarray(weights, dtype=np.float32)[:, None, None]  # (M, b, k)
    return np.ascontiguousarray(np.transpose(out, (1, 0, 2)).reshape(b, m_count * k))


def unit_rows(feats: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm along the last axis; all-zero rows stay zero (no NaN).

    Args:
        feats: (..., k) features.

    Returns:
        (..., k) float32 rows of norm 1 (or 0).
    """
    x = np.asarray(feats, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)  # fp64: no overflow
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norms == 0, 0.0, x / norms)  # NaN/inf rows stay non-finite (caught later)
    return out.astype(np.float32, copy=False)


def check_finite_rows(vectors: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """Return ``vectors`` (b, D), raising :class:`NonFiniteError` naming non-finite examples."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        bad_ids = [int(i) for i in np.asarray(ids)[bad][:10]]
        raise NonFiniteError(
            f"{what} are NaN or infinite for {int(bad.sum())} example(s), ids {bad_ids}; "
            "re-featurize these examples (a diverged checkpoint gives NaN weights)"
        )
    return vectors


class TracInCPScorer(Scorer):
    """TracInCP: learning-rate-weighted gradient dot products summed over checkpoints.

    ``tau(z)_i = sum_c eta_c <phi_c(z), phi_c,i>`` (docs/methods.md section 4), as the inner product of
    ``concat_c(sqrt(eta_c) phi_c,i)`` and ``concat_c(sqrt(eta_c) phi_c(z))``. The features are
    gradients of the measured output ``f`` (see the module docstring); ``Q`` is ignored.

    Args:
        learning_rates: ``eta_c``, one per checkpoint, in the order of the features' M axis
            (the learning rate in effect while training from checkpoint c to the next). Each
            must be finite and >= 0, and at least one > 0.

    Raises:
        ConfigError: empty, negative, non-finite or all-zero learning rates.
    """

    name = "tracin"

    def __init__(self, learning_rates: Sequence[float]) -> None:
        try:
            etas = np.asarray(list(learning_rates), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"learning_rates must be a sequence of numbers, one per checkpoint, got "
                f"{learning_rates!r}"
            ) from exc
        if etas.ndim != 1 or etas.size == 0:
            raise ConfigError(
                "learning_rates must list one learning rate per checkpoint, e.g. [0.1, 0.1, 0.01]"
            )
        if not np.isfinite(etas).all() or (etas < 0).any():
            raise ConfigError(
                f"learning rates must be finite and >= 0, got {etas.tolist()}; pass the "
                "optimiser's step sizes at the saved checkpoints"
            )
        if not (etas > 0).any():
            raise ConfigError("all learning rates are 0, so every score would be 0; pass the step sizes")
        self.learning_rates = etas

    def hyperparameters(self) -> dict[str, Any]:
        return {"learning_rates": [float(e) for e in self.learning_rates]}

    def _check(self, m_count: int) -> None:
        if m_count != len(self.learning_rates):
            raise ConfigError(
                f"TracInCP got {len(self.learning_rates)} learning rates for features of "
                f"{m_count} checkpoints; pass exactly one learning rate per checkpoint"
            )

    def fit(self, train: FeatureSource, progress: bool = False) -> "TracInCPScorer":
        """Nothing to learn; checks that there is one learning rate per checkpoint."""
        self._check(len(train.checkpoints))
        return self

    def _transform(self, block: FeatureBlock, side: str) -> np.ndarray:
        self._check(block.feats.shape[0])
        out = concat_checkpoints(block.feats, np.sqrt(self.learning_rates))  # (b, M*k)
        return check_finite_rows(out, block.ids, f"TracInCP {side} vectors")

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float32: ``concat_c(sqrt(eta_c) phi_c,i)``."""
        return self._transform(block, "train")

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*k) float32: ``concat_c(sqrt(eta_c) phi_c(z))``."""
        return self._transform(block, "query")

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"learning_rates": self.learning_rates.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "TracInCPScorer":
        """Check saved learning rates (if any) agree with this scorer's."""
        if "learning_rates" in state:
            saved = np.asarray(state["learning_rates"], dtype=np.float64)
            same = saved.shape == self.learning_rates.shape and np.allclose(
                saved, self.learning_rates, rtol=1e-12, atol=0)
            if not same:
                raise ConfigError(
                    f"saved TracInCP state used learning rates {saved.tolist()}, this scorer "
                    f"{self.learning_rates.tolist()}; rebuild the index or use the saved values"
                )
        return self


class GradDotScorer(Scorer):
    """Grad-Dot: gradient dot products averaged over checkpoints.

    ``tau(z)_i = (1/M) sum_c <phi_c(z), phi_c,i>`` (docs/methods.md section 4; with one checkpoint
    the plain ``<phi(z), phi_i>``). Train side ``concat_c(phi_c,i) / M``, query side
    ``concat_c(phi_c(z))``. ``Q`` is ignored.
    """

    name = "graddot"

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float32: ``concat_c(phi_c,i) / M``."""
        m_count = block.feats.shape[0]
        out = concat_checkpoints(block.feats, np.full(m_count, 1.0 / m_count))
        return check_finite_rows(out, block.ids, "Grad-Dot train vectors")

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*k) float32: ``concat_c(phi_c(z))``."""
        return check_finite_rows(concat_checkpoints(block.feats), block.ids, "Grad-Dot query vectors")


class GradCosScorer(Scorer):
    """Grad-Cos: cosine similarity of gradients, averaged over checkpoints.

    ``tau(z)_i = (1/M) sum_c <u_c(z), u_c,i>`` with ``u = phi / ||phi||_2`` per checkpoint and
    example (docs/methods.md section 4); zero gradients give ``u = 0`` and score 0. Scores lie in
    [-1, 1] and a training example's similarity with itself is 1 (for a nonzero gradient).
    Train side ``concat_c(u_c,i) / M``, query side ``concat_c(u_c(z))``. ``Q`` is ignored.
    """

    name = "gradcos"

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float32: ``concat_c(u_c,i) / M``."""
        m_count = block.feats.shape[0]
        out = concat_checkpoints(unit_rows(block.feats), np.full(m_count, 1.0 / m_count))
        return check_finite_rows(out, block.ids, "Grad-Cos train vectors")

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*k) float32: ``concat_c(u_c(z))``."""
        out = concat_checkpoints(unit_rows(block.feats))
        return check_finite_rows(out, block.ids, "Grad-Cos query vectors")


__all__ = [
    "GradCosScorer", "GradDotScorer", "TracInCPScorer", "check_finite_rows", "concat_checkpoints",
    "unit_rows",
]
