"""TRAK (docs/methods.md section 3).

For each checkpoint m: ``K_m = Phi_m^T Phi_m + lambda_m I`` with
``lambda_m = lambda_rel * mean(diag(Phi_m^T Phi_m))``, factored by Cholesky in float64. By default
(``lambda_rel="auto"``) the ridge comes from each kernel's spectrum: lambda_m is the value at which
the effective dimension ``df(lambda) = sum_j s_j / (s_j + lambda)`` of the kernel's eigenvalues
``s_j`` is :func:`auto_df` (see :func:`auto_lambdas`; measured in ``benchmarks/ridge.py``). The score of query z for train example i is

    tau(z)_i = [ (1/M) sum_m phi_m,i^T K_m^{-1} phi_m(z) ] * [ (1/M) sum_m Q_m,i ]

As two transforms in the whitened space of each kernel's Cholesky factor ``K_m = L_m L_m^T``
(so ``K_m^{-1} = L_m^{-T} L_m^{-1}``): ``T_train(z_i) = concat_m(L_m^{-1} phi_m,i) * Qbar_i / M``
and ``T_query(z) = concat_m(L_m^{-1} phi_m(z))``; their inner product is exactly tau(z)_i. Both
sides live in one well-conditioned space, which approximate (IVF, HNSW) search needs: indexing
``phi_i`` against ``K^{-1} phi(z)`` stretches the train side by the kernel's condition number.
Only ``Qbar_i`` (train side) makes the vectors' norms differ.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from tda.errors import ConfigError, NonFiniteError, ShapeError, TDAError
from tda.core.features import FeatureBlock, FeatureSource
from tda.scorers.base import Scorer

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Default ridge: chosen per checkpoint from the kernel's spectrum (:func:`auto_lambdas`).
DEFAULT_LAMBDA_REL = "auto"
#: ``df = AUTO_DF_BASE * M ** AUTO_DF_POWER * k ** 0.25 * sqrt(spread)``, at most ``AUTO_DF_CAP * k`` (:func:`auto_df`)
AUTO_DF_BASE, AUTO_DF_POWER, AUTO_DF_CAP = 0.95, 0.43, 0.6
#: the most of a rank-deficient kernel's rank the automatic ridge may target (:func:`auto_lambdas`)
RANK_CAP = 0.9
#: how the automatic ridge is described in manifests (``scorer.json``'s ``lambda_rule``)
AUTO_RULE = (f"df = {AUTO_DF_BASE} M^{AUTO_DF_POWER} k^0.25 sqrt(spread) (1 - s_1 / trace), "
             f"spread = ||Phi||_*^2 / ||Phi||_F^2, between 1 and {AUTO_DF_CAP} k")


def spread(eigenvalues: "torch.Tensor") -> "torch.Tensor":
    """Per checkpoint, the participation ratio of the feature matrix's singular values,
    ``(sum_j sqrt(s_j))^2 / sum_j s_j = ||Phi||_*^2 / ||Phi||_F^2``: between 1 (one direction) and
    the rank (a flat spectrum). (M, k) eigenvalues of ``Phi_m^T Phi_m`` -> (M,) float64."""
    import torch

    s = eigenvalues.clamp(min=0).to(torch.float64)
    return s.sqrt().sum(dim=1) ** 2 / s.sum(dim=1).clamp(min=1e-300)


def spread_rule_df(eigenvalues: "torch.Tensor", models: int) -> "torch.Tensor":
    """The previous automatic target, ``0.95 M^0.43 k^0.25 sqrt(spread)`` at most ``0.6 k`` (fitted on
    seven data set / model pairs with n >= ~k and mostly 10 classes; ``benchmarks/ridge.py``)."""
    k = eigenvalues.shape[1]
    return _spread_target(eigenvalues, models).clamp(max=AUTO_DF_CAP * k)


def _spread_target(eigenvalues: "torch.Tensor", models: int) -> "torch.Tensor":
    k = eigenvalues.shape[1]
    return AUTO_DF_BASE * max(1, models) ** AUTO_DF_POWER * k ** 0.25 * spread(eigenvalues).sqrt()


def concentration(eigenvalues: "torch.Tensor") -> "torch.Tensor":
    """Per checkpoint, ``1 - s_1 / sum_j s_j``: the share of the kernel's trace outside its top
    direction (near 0 when one direction, e.g. the class direction of a binary task, dominates)."""
    import torch

    s = eigenvalues.clamp(min=0).to(torch.float64)
    return 1.0 - s.max(dim=1).values / s.sum(dim=1).clamp(min=1e-300)


def numerical_rank(eigenvalues: "torch.Tensor") -> "torch.Tensor":
    """Per checkpoint, the eigenvalues above 1e-9 of the largest (at most n, the training examples)."""
    import torch

    s = eigenvalues.clamp(min=0).to(torch.float64)
    top = s.max(dim=1).values.clamp(min=1e-300)
    return (s > top[:, None] * 1e-9).sum(dim=1).clamp(min=1).to(torch.float64)


def auto_df(eigenvalues: "torch.Tensor", models: int) -> "torch.Tensor":
    """Target effective dimension of each kernel of an ensemble of ``models``:
    ``0.95 M^0.43 k^0.25 sqrt(spread) x (1 - s_1 / trace)``, between 1 and ``0.6 k``.

    More models average more checkpoint-specific noise away and bear a weaker ridge (``M^0.43``).
    The LDS-optimal df tracks how many directions the gradients actually spread over
    (:func:`spread_rule_df`, fitted on seven data set / model pairs, mostly 10 classes). When one
    direction holds much of the kernel's trace (two classes: the class direction) the scores must
    keep it, so the target shrinks with :func:`concentration` (``benchmarks/ridge_regimes.py``: two
    classes, fewer examples than k, text; a further ``sqrt(rank / k)`` factor for n < k helped
    there but cost the char LM 0.02-0.04, so it is not used).

    Args:
        eigenvalues: (M, k) eigenvalues of each ``Phi_m^T Phi_m``.
        models: ensemble size M (each kernel's target uses it).

    Returns:
        (M,) float64 targets.
    """
    k = eigenvalues.shape[1]
    df = _spread_target(eigenvalues, models) * concentration(eigenvalues)
    return df.clamp(min=1.0, max=AUTO_DF_CAP * k)  # at least the top direction (a ridge near s_1, not 1e6 s_1)


def auto_lambdas(eigenvalues: "torch.Tensor", df: "torch.Tensor | float") -> "torch.Tensor":
    """Per checkpoint, the ridge at which ``df(lambda) = min(df, RANK_CAP * rank)`` (bisection in
    log lambda).

    ``df`` cannot exceed the kernel's numerical rank, which is at most n when there are fewer
    training examples than feature dimensions. There a target may be out of reach, and the ridge
    would collapse to 0; it is capped at ``RANK_CAP`` of the rank.

    Args:
        eigenvalues: (M, k) eigenvalues of each ``Phi_m^T Phi_m`` (negative round-off is clipped).
        df: target effective dimension, one for all checkpoints or (M,).
    """
    import torch

    s = eigenvalues.clamp(min=0).to(torch.float64)
    top = s.max(dim=1).values.clamp(min=1e-300)
    rank = numerical_rank(s)  # (M,)
    target = torch.minimum(RANK_CAP * rank, torch.as_tensor(df, dtype=torch.float64).expand_as(rank))
    lo, hi = torch.log(top * 1e-12), torch.log(top * 1e6)  # df(lo) ~ rank, df(hi) ~ 0
    for _ in range(100):
        mid = (lo + hi) / 2
        df_mid = (s / (s + torch.exp(mid)[:, None])).sum(dim=1)
        lo, hi = torch.where(df_mid > target, mid, lo), torch.where(df_mid > target, hi, mid)  # target: (M,)
    return torch.exp((lo + hi) / 2)


class TRAKScorer(Scorer):
    """TRAK with a relative ridge, an ensemble over checkpoints and per-example ``Q``.

    Args:
        lambda_rel: ``"auto"`` (default: from each kernel's spectrum, :func:`auto_lambdas`), or a
            fixed ridge relative to the mean diagonal of ``Phi^T Phi`` (> 0).
        block_rows: training rows per block while accumulating the kernels.

    After :meth:`fit`, ``lambdas`` holds each checkpoint's ridge and ``chosen_lambda_rel`` their
    values relative to the mean diagonal.
    """

    name = "trak"

    def __init__(self, lambda_rel: float | str = DEFAULT_LAMBDA_REL, block_rows: int = 8192) -> None:
        self.lambda_rel = check_lambda_rel(lambda_rel)
        self.chosen_lambda_rel: np.ndarray | None = None
        self.target_df: np.ndarray | None = None  # (M,) the automatic ridge's effective dimensions
        self.block_rows = block_rows
        self.chol: np.ndarray | None = None  # (M, k, k) float64 lower factors
        self.lambdas: np.ndarray | None = None  # (M,)
        self.cond: np.ndarray | None = None  # (M,) condition-number estimates

    def hyperparameters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lambda_rel": self.lambda_rel}
        if self.chosen_lambda_rel is not None:
            out["chosen_lambda_rel"] = [float(x) for x in self.chosen_lambda_rel]
            out["lambda_rule"] = f"effective dimension {AUTO_RULE}" if self.lambda_rel == "auto" else "fixed"
            if self.target_df is not None:
                out["target_df"] = [round(float(x), 2) for x in self.target_df]
        return out

    def fit(self, train: FeatureSource, progress: bool = False) -> "TRAKScorer":
        import torch  # fitting only: the query side is numpy, so serving a fitted TRAK never loads torch

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
        if self.lambda_rel == "auto":
            eigenvalues = torch.linalg.eigvalsh(gram)
            self.target_df = auto_df(eigenvalues, m_count).numpy()
            lambdas = auto_lambdas(eigenvalues, torch.from_numpy(self.target_df))
        else:
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
        self.chosen_lambda_rel = (lambdas / scale).numpy()
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

    #: the index holds whitened vectors (stores.index.index_space), not those of older versions
    index_space = "whitened"

    def _whiten(self, block: FeatureBlock) -> np.ndarray:
        """``concat_m(L_m^{-1} phi_m)``: (b, M*k) float64."""
        self._require_fit(block)
        phi = np.asarray(block.feats, dtype=np.float64).transpose(0, 2, 1)  # (M, k, b)
        solved = forward_solve(self.chol, phi)  # (M, k, b): L_m^-1 phi_m
        m_count, k, b = solved.shape
        return solved.transpose(2, 0, 1).reshape(b, m_count * k)

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float32: ``concat_m(L_m^{-1} phi_m,i) * mean_m(Q_m,i) / M``."""
        weight = np.asarray(block.q, dtype=np.float64).mean(axis=0) / block.feats.shape[0]  # (b,)
        return (self._whiten(block) * weight[:, None]).astype(np.float32)

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*k) float32: ``concat_m(L_m^{-1} phi_m(z))``."""
        return self._whiten(block).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.chol is None:
            raise TDAError("TRAKScorer is not fitted: nothing to save")
        return {"chol": self.chol, "lambdas": self.lambdas, "cond": self.cond,
                "lambda_rel": np.array(str(self.lambda_rel)), "chosen_lambda_rel": self.chosen_lambda_rel}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "TRAKScorer":
        missing = {"chol", "lambdas", "lambda_rel"} - set(state)
        if missing:
            raise TDAError(f"TRAK state is missing {sorted(missing)}; refit the scorer")
        saved = str(state["lambda_rel"])
        if saved != str(self.lambda_rel):
            raise ConfigError(
                f"saved TRAK state used lambda_rel={saved}, this scorer {self.lambda_rel}; refit or use the "
                "saved value"
            )
        self.chol, self.lambdas = np.asarray(state["chol"]), np.asarray(state["lambdas"])
        if "chosen_lambda_rel" in state:
            self.chosen_lambda_rel = np.asarray(state["chosen_lambda_rel"])
        self.cond = np.asarray(state.get("cond", np.full(len(self.lambdas), np.nan)))
        return self


def forward_solve(chol: np.ndarray, rhs: np.ndarray, block: int = 128) -> np.ndarray:
    """``L^-1 rhs`` per batch entry, in numpy (float64): blocked forward substitution.

    Args:
        chol: (M, k, k) lower Cholesky factors ``L``.
        rhs: (M, k, m) right-hand sides.
    """
    k = chol.shape[-1]
    y = np.empty_like(rhs)
    for s in range(0, k, block):  # L y = rhs, top block first
        e = min(s + block, k)
        y[:, s:e] = np.linalg.solve(chol[:, s:e, s:e], rhs[:, s:e] - chol[:, s:e, :s] @ y[:, :s])
    return y


def check_lambda_rel(value: Any) -> float | str:
    """``"auto"`` or a positive finite float (YAML strings such as ``"1e-3"`` accepted)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        lam = float(value)
    except (TypeError, ValueError):
        lam = float("nan")
    if not lam > 0 or not np.isfinite(lam):
        raise ConfigError(f"lambda_rel must be 'auto' or a positive finite number, got {value!r}; the kernel "
                          "is singular without a ridge when k >= n ('auto' chooses it from the spectrum)")
    return lam
