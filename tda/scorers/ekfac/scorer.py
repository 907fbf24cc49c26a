"""EK-FAC influence as two transforms (docs/methods.md section 8; :mod:`tda.scorers.ekfac.factors`).

Per checkpoint m the influence of train example i on query z is
``tau_m(z)_i = <psi_m(z), Q_m,i phi_m,i>`` where ``phi`` are the factored features of
``grad f`` (:class:`tda.featurizers.factored.FactoredFeaturizer`) and ``psi`` the preconditioned query
features (:class:`tda.scorers.ekfac.features.EKFACQueryFeaturizer`, same projection); ``Q_i phi_i``
is minus the projected training-loss gradient, so ``tau > 0`` means that training on i raises
f(z). Over M checkpoints the score is the mean ``(1/M) sum_m tau_m``:

    T_train(z_i) = concat_m(Q_m,i phi_m,i) / M,      T_query(z) = concat_m(psi_m(z)).

The query features already hold ``H^-1``, so there is nothing to fit beyond checking the
training features; the query block's ``q`` is unused.
"""

from __future__ import annotations

import numpy as np

from tda.errors import NonFiniteError, ShapeError, TDAError
from tda.core.features import FeatureBlock, FeatureSource
from tda.scorers.base import Scorer
from tda.scorers.tracin import concat_checkpoints


class EKFACScorer(Scorer):
    """Inner products of preconditioned query features with ``Q``-weighted train features.

    Args:
        block_rows: training rows per block while checking the training features.
    """

    name = "ekfac"

    def __init__(self, block_rows: int = 8192) -> None:
        self.block_rows = block_rows
        self.shape: tuple[int, int] | None = None  # (M, k) of the training features

    def fit(self, train: FeatureSource, progress: bool = False) -> "EKFACScorer":
        n = 0
        for blk in train.iter_blocks(self.block_rows):
            if not (np.isfinite(blk.feats).all() and np.isfinite(blk.q).all()):
                raise NonFiniteError("training features or loss weights contain NaN or inf; re-featurize the store")
            n += len(blk)
        if n == 0:
            raise TDAError("cannot fit the EK-FAC scorer on an empty training set")
        self.shape = (len(train.checkpoints), int(train.k))
        return self

    def _check(self, block: FeatureBlock) -> None:
        if self.shape is not None and (block.feats.shape[0], block.feats.shape[2]) != self.shape:
            raise ShapeError(f"features have {block.feats.shape[0]} checkpoints x k={block.feats.shape[2]}, the "
                             f"training features {self.shape[0]} x k={self.shape[1]}; featurize queries with the "
                             "checkpoints, factors and projection of the training side (tda.ekfac_featurizers)")

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        self._check(block)
        weighted = np.asarray(block.feats, dtype=np.float32) * block.q[:, :, None]  # (M, b, k)
        return concat_checkpoints(weighted, np.full(block.feats.shape[0], 1.0 / block.feats.shape[0]))

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        self._check(block)
        return concat_checkpoints(block.feats)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.shape is None:
            raise TDAError("EKFACScorer is not fitted: nothing to save")
        return {"shape": np.array(self.shape, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "EKFACScorer":
        if "shape" not in state:
            raise TDAError("EK-FAC scorer state is missing 'shape'; refit the scorer")
        m, k = (int(v) for v in np.asarray(state["shape"]))
        self.shape = (m, k)
        return self
