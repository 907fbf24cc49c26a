"""The scorer seam: every scorer is two transforms and an inner product.

``score(z, z_i) = <T_query(z), T_train(z_i)>``. A scorer defines
:meth:`Scorer.fit` (optional) and the two transforms; :mod:`tda.core.kernel` owns the blocked matmul
loops, and the FAISS index stores ``T_train`` of every training example so that any scorer is
served by maximum inner product search.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from tda.core.features import FeatureBlock, FeatureSource


class Scorer(ABC):
    """Base class: subclasses implement the transforms and, if needed, fitting."""

    name: str = "scorer"
    #: False for scorers that hold scores of fixed queries (MAGIC) and cannot featurize a new one
    scores_new_inputs: bool = True

    def fit(self, train: FeatureSource, progress: bool = False) -> "Scorer":
        """Learn whatever the transforms need from the training features (default: nothing)."""
        return self

    @abstractmethod
    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """Train-side vectors, (b, D) float32."""

    @abstractmethod
    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """Query-side vectors, (m, D) float32."""

    def hyperparameters(self) -> dict[str, Any]:
        """Settings that change scores; recorded next to fitted state and indexes."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays (saved with ``np.savez``, loaded without pickle)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "Scorer":
        return self
