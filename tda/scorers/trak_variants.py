"""TRAK with two answer-shaping options: unit-normalised whitened vectors and the ``Q`` weight.

TRAK's score (:mod:`tda.scorers.trak`) is ``<L_m^-1 phi_m(z), L_m^-1 phi_m,i> * Qbar_i``, averaged
over checkpoints. Two factors other than the direction of a training example's whitened gradient
set its rank in every query's list:

- its *length* ``||L_m^-1 phi_m,i||`` (its leverage: examples the kernel has seen few of, which
  whitening stretches), and
- ``Qbar_i = mean_m (1 - p_m(y_i))``, large for the examples the model gets wrong and near 0 for
  those it fits well (a shortcut, a memorised odd example).

Both are the same for every query, so a few long, badly-fitted examples top many queries' lists
(Quanda's top-k cardinality) and well-fitted odd examples never do (shortcut detection;
``benchmarks/quanda.py`` measures both). ``normalize=True`` divides each checkpoint's whitened
vector by its length on both sides, so the score is the cosine after preconditioning, averaged
over checkpoints, as TrackStar does with its unit-normalised preconditioned gradients (``Q``
cancels: a per-example factor of the vector). ``q_weight=False`` keeps the lengths but drops
``Qbar``.

With ``normalize=False, q_weight=True`` this is :class:`~tda.scorers.trak.TRAKScorer` exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tda.core.features import FeatureBlock
from tda.scorers.trak import DEFAULT_LAMBDA_REL, TRAKScorer


class TRAKVariantScorer(TRAKScorer):
    """:class:`TRAKScorer` with ``normalize`` (cosine after whitening) and ``q_weight`` options.

    Args:
        lambda_rel: the ridge, as for :class:`TRAKScorer` (``"auto"`` by default).
        normalize: divide each checkpoint's whitened vector ``L_m^-1 phi_m`` by its L2 norm on
            both sides (zero vectors stay zero); the score is then
            ``(1/M) sum_m cos(L_m^-1 phi_m(z), L_m^-1 phi_m,i)``, in [-1, 1].
        q_weight: multiply the train side by ``Qbar_i`` (TRAK's default; no effect when
            ``normalize`` is set, since ``Qbar_i`` scales the whole vector of example i).
        block_rows: training rows per block while accumulating the kernels.
    """

    name = "trak"

    def __init__(self, lambda_rel: float | str = DEFAULT_LAMBDA_REL, normalize: bool = False,
                 q_weight: bool = True, block_rows: int = 8192) -> None:
        super().__init__(lambda_rel=lambda_rel, block_rows=block_rows)
        self.normalize = bool(normalize)
        self.q_weight = bool(q_weight)

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(normalize=self.normalize, q_weight=self.q_weight)
        return out

    def _unit(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float64 whitened vectors, each checkpoint's part of unit norm when ``normalize``."""
        white = self._whiten(block)  # (b, M*k)
        if not self.normalize:
            return white
        b, m_count = white.shape[0], block.feats.shape[0]
        parts = white.reshape(b, m_count, -1)
        norms = np.linalg.norm(parts, axis=2, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            parts = np.where(norms > 0, parts / norms, 0.0)
        return parts.reshape(b, -1)

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float32: the (unit) whitened vectors / M, times ``Qbar_i`` when weighted."""
        m_count = block.feats.shape[0]
        weight = np.full(len(block), 1.0 / m_count)
        if self.q_weight and not self.normalize:
            weight = weight * np.asarray(block.q, dtype=np.float64).mean(axis=0)
        return (self._unit(block) * weight[:, None]).astype(np.float32)

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*k) float32: the (unit) whitened query vectors."""
        return self._unit(block).astype(np.float32)


#: the keys of ``scorer_options`` / ``score.options`` that select :class:`TRAKVariantScorer`
VARIANT_KEYS = ("normalize", "q_weight")


def trak_scorer(normalize: bool = False, q_weight: bool = True, **options: Any) -> TRAKScorer:
    """TRAK as its options ask: :class:`TRAKVariantScorer` when they change its answer
    (``normalize``, or no ``q_weight``), else plain :class:`TRAKScorer` (the defaults are TRAK's).
    The one rule of both the Python API and ``score.options``."""
    if bool(normalize) or not bool(q_weight):
        return TRAKVariantScorer(normalize=bool(normalize), q_weight=bool(q_weight), **options)
    return TRAKScorer(**options)


__all__ = ["TRAKVariantScorer", "VARIANT_KEYS", "trak_scorer"]
