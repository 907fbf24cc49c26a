"""TRAK (METHODS.md section 3).

For each checkpoint m: ``K_m = Phi_m^T Phi_m + lambda_m I`` with
``lambda_m = lambda_rel * mean(diag(Phi_m^T Phi_m))``, factored by Cholesky in float64. The
score of query z for train example i is

    tau(z)_i = [ (1/M) sum_m phi_m,i^T K_m^{-1} phi_m(z) ] * [ (1/M) sum_m Q_m,i ]

As two transforms: ``T_train(z_i) = concat_m(phi_m,i) * Qbar_i / M`` and
``T_query(z) = concat_m(K_m^{-1} phi_m(z))``; their inner product is exactly tau(z)_i.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError, ShapeError, TDAError
from ..features import FeatureBlock, FeatureSource
from .base import Scorer

logger = logging.getLogger(__name__)

#: Default relative ridge. Keeps K positive definite when k >= n and damps directions the
#: training gradients barely span (chosen on held-out LDS folds, see README).
DEFAULT_LAMBDA_REL = 1e-2


class TRAKScorer(Scorer):
    """TRAK with a relative ridge, an ensemble over checkpoints and per-example ``Q``.

    Args:
        lambda_rel: ridge relative to the mean diagonal of ``Phi^T Phi``. Must be > 0.
        block_rows: training rows per block while accumulating the kernels.
    """

    name = "trak"

    def __init__(self, lambda_rel: float = DEFAULT_LAMBDA_REL, block_rows: int = 8192) -> None:
        if not lambda_rel > 0 or not np.isfinite(lambda_rel):
            raise ConfigError(
                f"lambda_rel must be a positive finite number, got {lambda_rel}; the kernel is "
                "singular without a ridge when k >= n (try 1e-2)"
            )
        self.lambda_rel = float(lambda_rel)
        self.block_rows = block_rows
        self.chol: np.ndarray | None = None  # (M, k, k) float64 lower factors
        self.lambdas: np.ndarray | None = None  # (M,)
        self.cond: np.ndarray | None = None  # (M,) condition-number estimates

    def hyperparameters(self) -> dict[str, Any]:
        return {"lambda_rel": self.lambda_rel}

    def fit(self, train: FeatureSource, progress: bool = False) -> "TRAKScorer":
        m_count, k = len(train.checkpoints), train.k
        gram = torch.zeros(m_count, k, k, dtype=torch.float64)
        n = 0
        for blk in train.iter_blocks(self.block_rows):
            f = torch.from_numpy(np.ascontiguousarray(blk.feats, dtype=np.float64))  # (M, b, k)
            gram += f.transpose(1, 2) @ f
            n += len(blk)
        if n == 0:
            raise TDAError("cannot fit TRAK on an empty training set")
        if not torch.isfinite(gram).all():
            raise NonFiniteError("training features contain NaN or inf; re-featurize the store")
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)  # (M,)
        if bool((scale <= 0).any()):
            raise TDAError("a checkpoint's training features are all zero; check the model and data")
        lambdas = self.lambda_rel * scale
        kern = gram + lambdas[:, None, None] * torch.eye(k, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(kern)
        if bool((info != 0).any()):
            raise TDAError(
                f"TRAK kernel is not positive definite (lambda_rel={self.lambda_rel}); raise "
                "lambda_rel"
            )
        diag = torch.diagonal(chol, dim1=1, dim2=2)
        self.cond = ((diag.max(dim=1).values / diag.min(dim=1).values) ** 2).numpy()
        for m, c in enumerate(self.cond):
            logger.info("TRAK checkpoint %d: n=%d k=%d lambda=%.3g cond~%.3g", m, n, k, lambdas[m], c)
        self.chol, self.lambdas = chol.numpy(), lambdas.numpy()
        return self

    def _require_fit(self, block: FeatureBlock) -> None:
        if self.chol is None:
            raise TDAError("TRAKScorer is not fitted: call fit(train_features) first")
        m_count, _, k = block.feats.shape
        if (m_count, k) != (self.chol.shape[0], self.chol.shape[1]):
            raise ShapeError(
                f"features have {m_count} checkpoints x k={k}, the fitted scorer has "
                f"{self.chol.shape[0]} x k={self.chol.shape[1]}; featurize with the same "
                "checkpoints and projector"
            )

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        self._require_fit(block)
        m_count, b, k = block.feats.shape
        weight = block.q.mean(axis=0) / m_count  # (b,)
        out = np.transpose(block.feats, (1, 0, 2)).reshape(b, m_count * k)  # (b, M*k)
        return (out * weight[:, None]).astype(np.float32)

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        self._require_fit(block)
        chol = torch.from_numpy(self.chol)  # (M, k, k)
        phi = torch.from_numpy(np.asarray(block.feats, dtype=np.float64))  # (M, m, k)
        solved = torch.cholesky_solve(phi.transpose(1, 2), chol)  # (M, k, m)
        m_count, k, m = solved.shape
        return solved.permute(2, 0, 1).reshape(m, m_count * k).numpy().astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.chol is None:
            raise TDAError("TRAKScorer is not fitted: nothing to save")
        return {"chol": self.chol, "lambdas": self.lambdas, "cond": self.cond,
                "lambda_rel": np.array(self.lambda_rel)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "TRAKScorer":
        missing = {"chol", "lambdas", "lambda_rel"} - set(state)
        if missing:
            raise TDAError(f"TRAK state is missing {sorted(missing)}; refit the scorer")
        if float(state["lambda_rel"]) != self.lambda_rel:
            raise ConfigError(
                f"saved TRAK state used lambda_rel={float(state['lambda_rel'])}, this scorer "
                f"{self.lambda_rel}; refit or use the saved value"
            )
        self.chol, self.lambdas = np.asarray(state["chol"]), np.asarray(state["lambdas"])
        self.cond = np.asarray(state.get("cond", np.full(len(self.lambdas), np.nan)))
        return self
