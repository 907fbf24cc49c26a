"""RepSim: similarity of hidden representations (docs/methods.md section 5).

Features are representations ``h_c(z)`` of a named module under each checkpoint c (the
FeatureBlock's M axis), produced by :class:`tda.featurizers.representations.RepresentationFeaturizer`.
The score is averaged over checkpoints like Grad-Dot:

- ``metric="cosine"``: ``tau(z)_i = (1/M) sum_c cos(h_c(z), h_c(z_i))``: rows normalised to unit
  L2 norm on both sides (zero rows stay zero), train side ``concat_c(u_c,i) / M``.
- ``metric="dot"``: ``tau(z)_i = (1/M) sum_c <h_c(z), h_c(z_i)>``.

The loss weights ``q`` in the block are ignored (the representation featurizer writes ones).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tda.errors import ConfigError
from tda.core.features import FeatureBlock
from tda.scorers.base import Scorer
from tda.scorers.tracin import check_finite_rows, concat_checkpoints, unit_rows

METRICS = ("cosine", "dot")


class RepSimScorer(Scorer):
    """Cosine (default) or dot-product similarity of representations, averaged over checkpoints.

    Args:
        metric: ``"cosine"`` or ``"dot"``.

    Raises:
        ConfigError: an unknown metric.
    """

    name = "repsim"

    def __init__(self, metric: str = "cosine") -> None:
        if metric not in METRICS:
            raise ConfigError(f"RepSim metric {metric!r} is unknown; use one of {list(METRICS)}")
        self.metric = metric

    def hyperparameters(self) -> dict[str, Any]:
        return {"metric": self.metric}

    def _rows(self, block: FeatureBlock) -> np.ndarray:
        return unit_rows(block.feats) if self.metric == "cosine" else block.feats  # (M, b, h)

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*h) float32: ``concat_c(u_c,i) / M`` (``u = h`` for ``dot``)."""
        m_count = block.feats.shape[0]
        out = concat_checkpoints(self._rows(block), np.full(m_count, 1.0 / m_count))
        return check_finite_rows(out, block.ids, "RepSim train vectors")

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*h) float32: ``concat_c(u_c(z))``."""
        return check_finite_rows(concat_checkpoints(self._rows(block)), block.ids, "RepSim query vectors")


__all__ = ["METRICS", "RepSimScorer"]
