"""EK-FAC query and train features through the factored projection (docs/methods.md sections 2, 8).

The influence ``tau(z)_i = grad f(z)^T H^-1 (Q_i grad f_i)`` (:mod:`tda.scorers.ekfac.factors`) is an inner
product of two per-example vectors projected by the SAME factored matrices
(:class:`tda.featurizers.factored.FactoredProjector`, per layer ``P_out (d_out x k_out)``, ``P_in (d_in x
k_in)``):

- train side: the factored features of ``grad f_i`` (a plain
  :class:`~tda.featurizers.factored.FactoredFeaturizer`: ``c_L P_out^T G_i P_in`` from the captured
  activations and output gradients, never forming ``G_i``), times ``Q_i`` in the scorer
  (:class:`tda.scorers.EKFACScorer`);
- query side (:class:`EKFACQueryFeaturizer`): the preconditioned gradient projected,
  ``s_L P_out^T H_L^-1 G_z P_in``. The elementwise division by ``Lambda + lambda_L`` breaks the
  low-rank structure of ``G_z``, so the rotated gradient ``R = (Q_S^T delta)^T (Q_A^T a)``
  (d_out x d_in, a sum over positions) is formed per query and layer, divided, and mapped by the
  precomputed ``M_out = Q_S^T P_out`` and ``M_in = Q_A^T P_in``:
  ``P_out^T Q_S (R / (Lambda + lambda)) Q_A^T P_in = M_out^T (R / (Lambda + lambda)) M_in``.

Factors fitted in the projection's space (``EKFACFactors.fit(..., projection=...)``, what
:func:`ekfac_featurizers`'s callers and the ``ekfac`` scorer in configs do; LoGra) take the other
route: the query's projected gradient ``G~_z = P_out^T G_z P_in`` is preconditioned by the
EK-FAC of the projected gradients, ``(1 / c_L) U_S ((U_S^T G~_z U_A) / (Lambda~ + lambda)) U_A^T``,
so the score is the influence in the projected space. Preconditioning in the full space and
projecting afterwards (full-space factors with a projection, below) lets the projection's error
dominate: LDS 0.01 against 0.45 exact on an MNIST MLP; it is kept only for full-space factors.

Scale (full-space factors): with ``E[P P^T] = g I`` (``g = k`` for a random factor, 1 for the identity) the query
scale ``s_L = 1 / (c_L g_in g_out)`` makes ``E <query, train> = <H_L^-1 G_z, G_i>``: projected
scores estimate the exact (unprojected) EK-FAC influence, not a multiple of it. With
``k_in = k_out = None`` both factors are the identity and the features are exact.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.models.defaults import default_task, snapshot
from tda.data.loading import Collate, iter_batches
from tda.scorers.ekfac.factors import EKFACFactors
from tda.scorers.ekfac.fit import CHUNK_ELEMENTS, DEFAULT_DAMPING_REL, joined_matrices, project_matrices
from tda.errors import CheckpointError, ShapeError, TDAError
from tda.featurizers.factored import Captures, FactoredFeaturizer, LayerSpec
from tda.core.features import ArrayFeatures, FeatureBlock, concat_blocks
from tda.featurizers.gradient import StateDict
from tda.core.kernel import TopK, score_matrix, top_k
from tda.scorers.ekfac.scorer import EKFACScorer
from tda.models.tasks import Batch, Task

logger = logging.getLogger(__name__)

#: logged when full-space factors meet a projection: the preconditioned query is projected after
#: H^-1, and the projection's error then dominates (measured on the MNIST MLP; docs/benchmarks/peers.md, EK-FAC)
PROJECTED_WARNING = ("EK-FAC factors fitted in the full layer space with a projection (k_in=%s, k_out=%s): the "
                     "query is preconditioned before projecting, and the projection's error then dominates the "
                     "scores (small-drop LDS 0.01 at 32 x 32 on an MNIST MLP). Fit the factors in the projection's "
                     "space instead (EKFACFactors.fit(..., projection=...), as ekfac_featurizers' callers, "
                     "EKFACAttributor and the ekfac scorer do: LDS 0.64 there, exact 0.50)")


def _check_matching(specs: list[LayerSpec], factors: EKFACFactors) -> None:
    """Raise unless the model's layers for the factors' layer names are the fitted ones."""
    if specs != factors.layers:
        differ = [f"{a.name}: model {a.d_out}x{a.d_in}, factors {b.d_out}x{b.d_in}"
                  for a, b in zip(specs, factors.layers) if a != b]
        raise ShapeError(f"the model's layers do not match the EK-FAC factors ({len(specs)} vs {len(factors.layers)} "
                         f"layers; {differ[:5]}); fit the factors on this architecture")


class EKFACQueryFeaturizer(FactoredFeaturizer):
    """Preconditioned, factored-projected query gradients: a :class:`~tda.featurizers.factored.FactoredFeaturizer`
    over the factors' layers whose per-chunk projection preconditions first.

    Args:
        model: the network. task: output function ``f`` (its gradient is preconditioned).
        factors: fitted :class:`~tda.scorers.ekfac.factors.EKFACFactors` of this model, one per checkpoint.
        k_in, k_out, seed, kind: the factored projection; must equal the train side's
            (use :func:`ekfac_featurizers`). ``None``: identity (exact features).
        device: default the model's. chunk_size: examples per forward pass.
    """

    what = "preconditioned query features"

    def __init__(self, model: nn.Module, task: Task, factors: EKFACFactors, k_in: int | None = 16,
                 k_out: int | None = 16, seed: int = 0, kind: str = "rademacher",
                 device: str | torch.device | None = None, chunk_size: int | None = None) -> None:
        super().__init__(model, task, k_in, k_out, seed, kind, [s.name for s in factors.layers], device, chunk_size)
        _check_matching(self.layers, factors)
        self.projected = factors.settings.projection is not None
        if self.projected:
            mine = {"k_in": k_in, "k_out": k_out, "seed": seed, "kind": kind}
            if factors.settings.projection != mine:
                raise ShapeError(f"the EK-FAC factors were fitted in the space of the projection "
                                 f"{factors.settings.projection}, not this featurizer's {mine}; fit them with "
                                 "projection=... equal to the featurizer's (ekfac_featurizers does)")
        elif k_in is not None or k_out is not None:
            logger.warning(PROJECTED_WARNING, k_in, k_out)
        self.factors, self.skipped = factors, list(factors.skipped)
        self._maps: dict[tuple, tuple[Tensor, Tensor, Tensor, float]] = {}
        self._verified: int | None = None

    def spec(self) -> dict[str, Any]:
        """The train side's spec plus the factors' (settings, checkpoints, weight digests)."""
        return {**super().spec(), "side": "query", "ekfac": self.factors.spec()}

    def _gain(self, layer: LayerSpec, side: str) -> int:
        width, dim = self.projector.width(layer, side), (layer.d_in if side == "in" else layer.d_out)
        return width if width < dim else 1

    def _maps_for(self, checkpoint: int, index: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(M_out (d_out, k_out), 1 / (Lambda + lambda) (d_out, d_in), M_in (d_in, k_in), s_L)``."""
        key = (checkpoint, index, str(like.device), like.dtype)
        if key not in self._maps:
            layer, f = self.layers[index], self.factors.factors[self.factors.index(checkpoint)][index]
            p_out, p_in = (self.projector.factor(checkpoint, layer, side) for side in ("out", "in"))
            m_out = f.q_s.T if p_out is None else f.q_s.T @ p_out.double()
            m_in = f.q_a.T if p_in is None else f.q_a.T @ p_in.double()
            scale = 1.0 / (self.projector.scales[index] * self._gain(layer, "in") * self._gain(layer, "out"))
            self._maps[key] = (m_out.to(like), f.inverse().to(like), m_in.to(like), scale)
        return self._maps[key]

    def project(self, captures: Captures, checkpoint: int) -> Tensor:
        """Preconditioned projected features (B, k) from per-layer captures (as
        :meth:`tda.featurizers.factored.FactoredProjector.project`, same layout)."""
        if len(captures) != len(self.layers):
            raise ShapeError(f"{len(captures)} captures for {len(self.layers)} layers")
        if self.projected:
            return self._project_in_space(captures, checkpoint)
        parts = []
        for i, (layer, calls) in enumerate(zip(self.layers, captures)):
            a, delta = joined_matrices(layer, calls)  # (B, N, d_in), (B, N, d_out)
            f = self.factors.factors[self.factors.index(checkpoint)][i]
            ra, rd = a @ f.q_a.to(a), delta @ f.q_s.to(a)
            m_out, inv, m_in, scale = self._maps_for(checkpoint, i, a)
            step = max(1, CHUNK_ELEMENTS // (layer.d_out * layer.d_in))
            rows = []
            for lo in range(0, a.shape[0], step):
                rot = rd[lo: lo + step].transpose(1, 2) @ ra[lo: lo + step]  # (b, d_out, d_in) = Q_S^T G Q_A
                rows.append(m_out.T @ (rot * inv) @ m_in)  # (b, k_out, k_in)
            parts.append(torch.cat(rows).reshape(a.shape[0], -1) * scale)
        return torch.cat(parts, dim=1)

    def _project_in_space(self, captures: Captures, checkpoint: int) -> Tensor:
        """Factors fitted in the projected space (LoGra): per layer
        ``(1 / c_L) U_S ((U_S^T G~ U_A) / (Lambda + lambda)) U_A^T`` with ``G~ = P_out^T G P_in``,
        so that ``<query, c_L G~_i> = <H~^-1 G~_z, G~_i>``, the influence in the projected space."""
        parts = []
        for i, (layer, calls) in enumerate(zip(self.layers, captures)):
            a, delta = project_matrices(self.projector, checkpoint, layer, *joined_matrices(layer, calls))
            f = self.factors.factors[self.factors.index(checkpoint)][i]
            q_a, q_s, inv = (t.to(a) for t in (f.q_a, f.q_s, f.inverse()))
            rot = (delta @ q_s).transpose(1, 2) @ (a @ q_a)  # (B, k_out, k_in) = U_S^T G~ U_A
            parts.append((q_s @ (rot * inv) @ q_a.T).reshape(a.shape[0], -1) / self.projector.scales[i])
        return torch.cat(parts, dim=1)

    def clear_cache(self) -> None:
        super().clear_cache()
        self._maps.clear()

    def featurize_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, k) float32 and Q (B,) float32, once the loaded weights match the factors."""
        if self._verified != checkpoint:
            self.factors.verify(self.model, checkpoint)
            self._verified = checkpoint
        return super().featurize_batch(batch, ids, checkpoint)

    def featurize(self, state: StateDict | str | Path, checkpoint: int,
                  batches: Iterable[tuple[np.ndarray, Batch]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids, features (B, k), Q (B,))`` per batch under checkpoint ``checkpoint``."""
        self.factors.index(checkpoint)
        self._verified = None
        yield from super().featurize(state, checkpoint, batches)


def ekfac_featurizers(model: nn.Module, task: Task, factors: EKFACFactors, k_in: int | None = 16,
                      k_out: int | None = 16, seed: int = 0, kind: str = "rademacher",
                      device: str | torch.device | None = None) -> tuple[FactoredFeaturizer, EKFACQueryFeaturizer]:
    """The train featurizer (plain factored features of ``grad f``) and the query featurizer
    (preconditioned), with the same projection; feed both to :class:`~tda.scorers.EKFACScorer`."""
    query = EKFACQueryFeaturizer(model, task, factors, k_in, k_out, seed, kind, device)
    train = FactoredFeaturizer(model, task, k_in, k_out, seed, kind, [s.name for s in factors.layers], device)
    if train.layers != query.layers:
        raise ShapeError("train and query featurizers selected different layers; pass the factors' layer names")
    return train, query


def featurize_data(featurizer, checkpoints: Sequence[StateDict | str | Path], checkpoint_ids: Sequence[int], data,
                   collate: Collate, batch_size: int = 64) -> FeatureBlock:
    """Features (M, n, k) of every row of ``data`` under every checkpoint, with ``Q`` (M, n)."""
    per = []
    for c, state in zip(checkpoint_ids, checkpoints):
        rows = [FeatureBlock(i, phi[None], q[None])
                for i, phi, q in featurizer.featurize(state, c, iter_batches(data, collate, batch_size))]
        per.append(concat_blocks(rows))
    return FeatureBlock(per[0].ids, np.concatenate([b.feats for b in per]), np.concatenate([b.q for b in per]))


class EKFACAttributor:
    """EK-FAC influence in memory, like :class:`tda.Attributor` (fit, scores, top_k).

    Args:
        model: the network (copied; neither it nor the state dicts change).
        checkpoints: state dicts or paths. collate: rows -> the task's tensors.
        task: default as :class:`tda.Attributor`'s.
        k_in: factored projection of each layer's input side (``None``: exact, unprojected).
        k_out: factored projection of each layer's output-gradient side (``None``: exact).
        seed: seed of the factored projection.
        kind: its random matrices, ``"rademacher"`` or ``"gaussian"``.
        layers: the layers fitted; this and the next five are those of
            :meth:`tda.scorers.ekfac.factors.EKFACFactors.fit_batches` (``fisher_seed`` is its ``seed``).
        fisher: as in :meth:`tda.scorers.ekfac.factors.EKFACFactors.fit_batches`.
        samples: as in :meth:`tda.scorers.ekfac.factors.EKFACFactors.fit_batches`.
        fisher_seed: its ``seed``.
        damping: as in :meth:`tda.scorers.ekfac.factors.EKFACFactors.fit_batches`.
        damping_rel: as in :meth:`tda.scorers.ekfac.factors.EKFACFactors.fit_batches`.
        strict: as in :meth:`tda.scorers.ekfac.factors.EKFACFactors.fit_batches`.
        batch_size: examples per batch. device: default the model's.
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[StateDict | str | Path], collate: Collate,
                 task: Task | None = None, k_in: int | None = 16, k_out: int | None = 16, seed: int = 0,
                 kind: str = "rademacher", layers: Sequence[str] | None = None, fisher: str = "sampled",
                 samples: int = 1, fisher_seed: int = 0, damping: float | None = None,
                 damping_rel: float = DEFAULT_DAMPING_REL, strict: bool = False, batch_size: int = 64,
                 device: str | torch.device | None = None) -> None:
        if not checkpoints:
            raise CheckpointError("at least one checkpoint is needed; pass [model.state_dict()] for one")
        self.checkpoints = [snapshot(c) for c in checkpoints]
        self.model = copy.deepcopy(model)
        self.task = task or default_task(self.model)
        self.collate, self.batch_size, self.device = collate, batch_size, device
        self.projection = dict(k_in=k_in, k_out=k_out, seed=seed, kind=kind)
        self.fit_args = dict(layers=layers, fisher=fisher, samples=samples, seed=fisher_seed, damping=damping,
                             damping_rel=damping_rel, strict=strict)
        self.scorer = EKFACScorer()
        self.factors: EKFACFactors | None = None
        self.train_features: ArrayFeatures | None = None

    def fit(self, train_data) -> "EKFACAttributor":
        """Fit the factors on ``train_data``, featurize it (train side) and fit the scorer."""
        self.factors = EKFACFactors.fit(self.model, self.task, train_data, self.collate, self.checkpoints,
                                        self.batch_size, device=self.device, projection=self.projection,
                                        **self.fit_args)
        self._train, self._query = ekfac_featurizers(self.model, self.task, self.factors, device=self.device,
                                                     **self.projection)
        block = featurize_data(self._train, self.checkpoints, self.factors.checkpoint_ids, train_data, self.collate,
                               self.batch_size)
        self.train_features = ArrayFeatures(block, self.factors.checkpoint_ids)
        self.scorer.fit(self.train_features)
        return self

    def featurize_queries(self, query_data) -> FeatureBlock:
        """Preconditioned query features (M, m, k)."""
        if self.factors is None or self.train_features is None:
            raise TDAError("call fit(train_data) before scoring")
        return featurize_data(self._query, self.checkpoints, self.factors.checkpoint_ids, query_data, self.collate,
                              self.batch_size)

    def scores(self, query_data) -> np.ndarray:
        """Dense influence (n_query, n_train); > 0 means training on the example raises f(query)."""
        return score_matrix(self.featurize_queries(query_data), self.scorer, self.train_features)

    def top_k(self, query_data, k: int = 10) -> TopK:
        """Top-k proponents (raise f) and opponents (lower f) per query, by training id."""
        return top_k(self.featurize_queries(query_data), self.scorer, self.train_features, k)


__all__ = ["EKFACAttributor", "EKFACQueryFeaturizer", "ekfac_featurizers", "featurize_data"]
