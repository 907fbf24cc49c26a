"""The one inner-product kernel every scorer goes through.

Scores are ``T_query @ T_train^T`` (the scorer seam, :mod:`tda.scorers.base`), computed block
by block over the training set so that memory holds one (m, block) slab at a time. Top-k proponents (largest
scores: training on them raises f(z)) and opponents (most negative: they lower f(z)) are kept
with a streaming merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from tda.errors import QueryError, ShapeError
from tda.core.features import FeatureBlock, FeatureSource

if TYPE_CHECKING:  # the scorers call this kernel; it only needs their two transforms
    import torch

    from tda.scorers.base import Scorer


@dataclass
class TopK:
    """Top-k training examples per query.

    Attributes:
        proponent_ids, proponent_scores: (m, k), largest scores first (raise f(z)).
        opponent_ids, opponent_scores: (m, k), most negative first (lower f(z)).
    """

    proponent_ids: np.ndarray
    proponent_scores: np.ndarray
    opponent_ids: np.ndarray
    opponent_scores: np.ndarray


def iter_score_blocks(
    query_vectors: np.ndarray, scorer: Scorer, train: FeatureSource, block_rows: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(train_ids (b,), scores (m, b))`` for consecutive training blocks.

    Args:
        query_vectors: (m, D) output of ``scorer.transform_query``.
        scorer: fitted scorer providing ``transform_train``.
        train: training feature source.
        block_rows: training rows per block.
    """
    import torch  # here, not at the top: readers of TopK (tda query on an index) never load torch

    q = torch.from_numpy(np.ascontiguousarray(query_vectors, dtype=np.float32))
    for blk in train.iter_blocks(block_rows):
        t = torch.from_numpy(np.ascontiguousarray(scorer.transform_train(blk), dtype=np.float32))
        if t.shape[1] != q.shape[1]:
            raise ShapeError(f"query vectors have D={q.shape[1]}, train vectors D={t.shape[1]}")
        yield blk.ids, (q @ t.T).numpy()


def score_matrix(
    query: FeatureBlock, scorer: Scorer, train: FeatureSource, block_rows: int = 4096
) -> np.ndarray:
    """Dense (m, n) float32 scores of every query against every training example."""
    qv = scorer.transform_query(query)
    parts = [s for _, s in iter_score_blocks(qv, scorer, train, block_rows)]
    if not parts:
        raise ShapeError("the training feature source is empty")
    return np.concatenate(parts, axis=1)


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int,
           largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    all_s = torch.cat([best_s, s], dim=1)
    all_i = torch.cat([best_i, i], dim=1)
    top = torch.topk(all_s, min(k, all_s.shape[1]), dim=1, largest=largest, sorted=True)
    return top.values, torch.gather(all_i, 1, top.indices)


def top_k(
    query: FeatureBlock, scorer: Scorer, train: FeatureSource, k: int = 10, block_rows: int = 4096
) -> TopK:
    """Streaming top-k proponents and opponents per query, exact (no index)."""
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    import torch

    qv = scorer.transform_query(query)
    m = qv.shape[0]
    empty_s = torch.empty(m, 0, dtype=torch.float32)
    empty_i = torch.empty(m, 0, dtype=torch.int64)
    pro = (empty_s, empty_i)
    opp = (empty_s, empty_i)
    n = 0
    for ids, scores in iter_score_blocks(qv, scorer, train, block_rows):
        s = torch.from_numpy(scores)
        i = torch.from_numpy(np.array(ids, dtype=np.int64)).unsqueeze(0).expand(m, -1)
        pro = _merge(*pro, s, i, k, largest=True)
        opp = _merge(*opp, s, i, k, largest=False)
        n += len(ids)
    if k > n:
        raise QueryError(f"asked for top-{k} but the training set has {n} examples")
    return TopK(pro[1].numpy(), pro[0].numpy(), opp[1].numpy(), opp[0].numpy())
