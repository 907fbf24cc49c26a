"""The approximate (IVF) index: exact when every cell is probed, and a quantizer trained on rows
drawn from the whole store, so a store sorted by class is indexed as well as a shuffled one."""

import numpy as np

from stores import FaissIndex
from stores.index import build_index
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import score_matrix
from tda.scorers import make_scorer


def _sorted_store(n_per: int = 400, clusters: int = 8, dim: int = 16, seed: int = 0):
    """Clustered vectors stored cluster after cluster (as a data set sorted by label is)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 4
    x = np.concatenate([c + rng.standard_normal((n_per, dim)) for c in centres]).astype(np.float32)
    n = len(x)
    block = FeatureBlock(ids=np.arange(n, dtype=np.int64) + 1000, feats=x[None], q=np.ones((1, n), np.float32))
    queries = (centres[rng.integers(0, clusters, 40)] + rng.standard_normal((40, dim))).astype(np.float32)
    qblock = FeatureBlock(ids=np.arange(40, dtype=np.int64), feats=queries[None], q=np.ones((1, 40), np.float32))
    return ArrayFeatures(block, [0]), qblock


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def test_ivf_probing_every_cell_equals_brute_force():
    train, qblock = _sorted_store()
    scorer = make_scorer("graddot")
    qv = scorer.transform_query(qblock)
    index = build_index(train, scorer, kind="ivf", nlist=8, nprobe=8, block_rows=256)
    dense = score_matrix(qblock, scorer, train)  # (40, n)
    top = index.top_k(qv, 10)
    exact_ids = train.ids[np.argsort(-dense, axis=1)[:, :10]]
    np.testing.assert_array_equal(np.sort(top.proponent_ids, 1), np.sort(exact_ids, 1))
    np.testing.assert_allclose(top.proponent_scores, -np.sort(-dense, 1)[:, :10], rtol=1e-5, atol=1e-5)
    assert index.meta["kind"] == "ivf" and len(index) == len(train)


def test_ivf_quantizer_sees_the_whole_sorted_store(tmp_path):
    """Trained on the first 64 * nlist rows of a sorted store, the quantizer knows few clusters and
    one probe finds little; trained on rows drawn across the store it finds the true top-10."""
    train, qblock = _sorted_store()
    scorer = make_scorer("graddot")
    qv = scorer.transform_query(qblock)
    dense = score_matrix(qblock, scorer, train)
    exact = train.ids[np.argsort(-dense, axis=1)[:, :10]]
    sampled = build_index(train, scorer, kind="ivf", nlist=8, nprobe=1, block_rows=256)
    blocks = ((b.ids, scorer.transform_train(b)) for b in train.iter_blocks(256))
    first_rows = FaissIndex.build(blocks, qv.shape[1], "ivf", nlist=8, nprobe=1, n_hint=len(train))
    r_sampled = _recall(sampled.top_k(qv, 10).proponent_ids, exact)
    r_first = _recall(first_rows.top_k(qv, 10).proponent_ids, exact)
    assert r_sampled >= 0.9 and r_sampled > r_first + 0.2, (r_sampled, r_first)
    sampled.save(tmp_path / "ivf")  # round trip keeps nprobe and answers
    again = FaissIndex.load(tmp_path / "ivf")
    np.testing.assert_array_equal(again.top_k(qv, 10).proponent_ids, sampled.top_k(qv, 10).proponent_ids)
