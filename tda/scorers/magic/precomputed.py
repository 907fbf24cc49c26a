"""Precomputed scores through the two-transforms seam (MAGIC's metagradients in a run).

MAGIC (:mod:`tda.scorers.magic`) differentiates the training run itself, so its scores come from a
reverse pass, not from features. :class:`PrecomputedScorer` keeps the (m, n) matrix so the run's
stages, the FAISS index and the dense scores treat it like any other scorer. Training example i
becomes column i of the matrix, ``transform_train -> scores[:, i]`` (D = m). Query j becomes the
unit vector e_j. Their inner product is ``scores[j, i]``.

Only the queries scored at fit time can be asked for. A new input needs another reverse pass
through training, so it gets a clear error.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tda.errors import ConfigError, ShapeError
from tda.core.features import FeatureBlock, FeatureSource
from tda.scorers.base import Scorer

#: ``compute(progress) -> (scores (m, n), query ids (m,), train ids (n,))``
Compute = Callable[[bool], tuple[np.ndarray, np.ndarray, np.ndarray]]


class PrecomputedScorer(Scorer):
    """Scores computed by ``compute`` at fit time, served through the two transforms.

    Args:
        compute: returns the score matrix and the ids of its rows (queries) and columns (training
            examples). ``None`` is allowed for a scorer that is only loaded from its state.
        name: the scorer's name in manifests (``"magic"``).
        settings: what the scores depend on (recorded as hyperparameters).
    """

    scores_new_inputs = False  # rows are the fitted queries' ids; other examples' ids would collide

    def __init__(self, compute: Compute | None = None, name: str = "magic",
                 settings: dict[str, Any] | None = None) -> None:
        self.compute, self.name, self.settings = compute, name, dict(settings or {})
        self.scores: np.ndarray | None = None
        self._set_ids(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def _set_ids(self, query_ids: np.ndarray, train_ids: np.ndarray) -> None:
        """Row and column ids, and their positions (looked up per block, built once)."""
        self.query_ids, self.train_ids = np.asarray(query_ids, np.int64), np.asarray(train_ids, np.int64)
        self._rows = {int(i): p for p, i in enumerate(self.query_ids.tolist())}
        self._cols = {int(i): p for p, i in enumerate(self.train_ids.tolist())}

    def fit(self, train: FeatureSource, progress: bool = False) -> "PrecomputedScorer":
        if self.compute is None:
            raise ConfigError(f"the {self.name} scorer has nothing to compute its scores with; load its state instead")
        scores, qids, tids = self.compute(progress)
        store_ids = np.concatenate([b.ids for b in train.iter_blocks()])
        if scores.shape != (len(qids), len(tids)):
            raise ShapeError(f"{self.name}: scores {scores.shape} do not match {len(qids)} queries x {len(tids)} "
                             "training examples")
        if set(store_ids.tolist()) != set(np.asarray(tids).tolist()):
            raise ShapeError(f"{self.name} scored other training examples than the feature store holds; rerun the "
                             "run's featurize stage (`tda run CONFIG --from featurize`)")
        if not np.isfinite(scores).all():
            raise ShapeError(f"{self.name} produced non-finite scores; lower train.lr (training diverged)")
        self.scores = np.asarray(scores, dtype=np.float32)
        self._set_ids(qids, tids)
        return self

    def _positions(self, index: dict[int, int], want: np.ndarray, what: str) -> np.ndarray:
        missing = [int(i) for i in want.tolist() if int(i) not in index]
        if missing:
            raise ConfigError(f"{self.name} scores only the {what} it was fitted on; id(s) {missing[:5]} are not among "
                              f"them. A new {what[:-1]} needs another reverse pass through training: add it to the "
                              "run's data and rerun")
        return np.array([index[int(i)] for i in want.tolist()], dtype=np.int64)

    def _fitted(self) -> np.ndarray:
        if self.scores is None:
            raise ConfigError(f"the {self.name} scorer is not fitted; call fit() or load_state_dict() first")
        return self.scores

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        scores = self._fitted()
        return np.ascontiguousarray(scores[:, self._positions(self._cols, block.ids, "training examples")].T)

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        scores = self._fitted()
        rows = self._positions(self._rows, block.ids, "queries")
        out = np.zeros((len(rows), scores.shape[0]), dtype=np.float32)
        out[np.arange(len(rows)), rows] = 1.0
        return out

    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.settings)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"scores": self._fitted(), "query_ids": self.query_ids, "train_ids": self.train_ids}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "PrecomputedScorer":
        self.scores = np.asarray(state["scores"], dtype=np.float32)
        self._set_ids(state["query_ids"], state["train_ids"])
        return self
