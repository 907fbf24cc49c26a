"""The blocked inner-product kernel: score_matrix and streaming top-k against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from tda.errors import QueryError, ShapeError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import iter_score_blocks, score_matrix, top_k
from tda.scorers import Scorer, TRAKScorer


class DotScorer(Scorer):
    """Plain dot product of the first checkpoint's features (no fitting)."""

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        return block.feats[0].astype(np.float32)

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        return block.feats[0].astype(np.float32)


def _block(rng: np.random.Generator, n: int, k: int = 8, m_count: int = 2, id_offset: int = 0,
           integer: bool = False) -> FeatureBlock:
    if integer:  # small integers: exact float32 products, many ties
        feats = rng.integers(-2, 3, size=(m_count, n, k)).astype(np.float32)
    else:
        feats = rng.standard_normal((m_count, n, k)).astype(np.float32)
    q = rng.uniform(0.1, 0.9, size=(m_count, n)).astype(np.float32)
    return FeatureBlock(id_offset + 3 * np.arange(n), feats, q)  # non-contiguous ids


@pytest.fixture
def trak_setup(rng):
    train = _block(rng, 50, id_offset=1000)
    query = _block(rng, 6)
    source = ArrayFeatures(train, [0, 1])
    return query, TRAKScorer(lambda_rel=1e-2).fit(source), source


def _check_top_k(top, scores: np.ndarray, ids: np.ndarray, k: int) -> None:
    """Tie-tolerant comparison with a brute-force sort of the dense score matrix."""
    m = scores.shape[0]
    for name in ("proponent_ids", "proponent_scores", "opponent_ids", "opponent_scores"):
        assert getattr(top, name).shape == (m, k)
    by_id = {int(i): j for j, i in enumerate(ids)}
    for r in range(m):
        desc = np.sort(scores[r])[::-1]
        np.testing.assert_allclose(top.proponent_scores[r], desc[:k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(top.opponent_scores[r], desc[::-1][:k], rtol=1e-6, atol=1e-6)
        for got_ids, got_scores in ((top.proponent_ids[r], top.proponent_scores[r]),
                                    (top.opponent_ids[r], top.opponent_scores[r])):
            assert len(set(got_ids.tolist())) == k  # distinct, real training ids
            cols = [by_id[int(i)] for i in got_ids]
            np.testing.assert_allclose(scores[r, cols], got_scores, rtol=1e-6, atol=1e-6)
        # sorted: proponents largest first, opponents most negative first
        assert np.all(np.diff(top.proponent_scores[r]) <= 1e-6)
        assert np.all(np.diff(top.opponent_scores[r]) >= -1e-6)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_equals_brute_force(trak_setup, k: int) -> None:
    query, scorer, source = trak_setup
    scores = score_matrix(query, scorer, source)
    top = top_k(query, scorer, source, k=k, block_rows=7)  # 8 blocks, the last partial
    _check_top_k(top, scores, source.ids, k)
    # exact argsort agreement where there are no ties (continuous random features)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top.proponent_ids, source.ids[order])
    np.testing.assert_array_equal(top.opponent_ids, source.ids[np.argsort(scores, axis=1)[:, :k]])
    assert np.all(top.opponent_scores[:, 0] < 0) and np.all(top.proponent_scores[:, 0] > 0)


def test_top_k_is_tolerant_of_ties(rng) -> None:
    train = _block(rng, 40, k=3, m_count=1, integer=True)
    train.feats[0, 20:] = train.feats[0, :20]  # every score appears at least twice
    query = _block(rng, 5, k=3, m_count=1, integer=True)
    source = ArrayFeatures(train, [0])
    scorer = DotScorer()
    scores = score_matrix(query, scorer, source)
    for block_rows in (3, 16, 4096):
        _check_top_k(top_k(query, scorer, source, k=6, block_rows=block_rows), scores, source.ids, 6)


def test_blocked_score_matrix_equals_one_block(trak_setup) -> None:
    query, scorer, source = trak_setup
    one = score_matrix(query, scorer, source, block_rows=4096)
    assert one.shape == (6, 50) and one.dtype == np.float32
    for block_rows in (1, 7, 49):
        np.testing.assert_allclose(score_matrix(query, scorer, source, block_rows=block_rows), one,
                                   rtol=1e-6, atol=1e-7)
    qv = scorer.transform_query(query).astype(np.float64)
    ref = qv @ scorer.transform_train(source.block).astype(np.float64).T
    np.testing.assert_allclose(one, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    blocks = list(iter_score_blocks(scorer.transform_query(query), scorer, source, block_rows=20))
    assert [len(ids) for ids, _ in blocks] == [20, 20, 10]
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in blocks]), source.ids)


def test_impossible_k_raises_query_error(trak_setup) -> None:
    query, scorer, source = trak_setup
    with pytest.raises(QueryError, match="asked for top-51 but the training set has 50 examples"):
        top_k(query, scorer, source, k=51)
    with pytest.raises(QueryError, match="k must be >= 1"):
        top_k(query, scorer, source, k=0)


def test_mismatched_transform_widths_raise(rng) -> None:
    train = ArrayFeatures(_block(rng, 10, k=4, m_count=1), [0])
    query = _block(rng, 2, k=5, m_count=1)
    with pytest.raises(ShapeError, match="query vectors have D=5, train vectors D=4"):
        score_matrix(query, DotScorer(), train)
