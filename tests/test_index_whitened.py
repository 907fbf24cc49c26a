"""TRAK indexed in its whitened space, the three index kinds against brute force, and the recall
check of `tda run` (recorded in index.json, a warning naming the fix when it is low)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from pipelines.config import load_config, parse_config
from pipelines.layout import RunPaths
from pipelines.stages.index import _warn_recall, load_index
from stores import FaissIndex
from stores.index import ExactTopK, build_index, recall_at_k
from tda.errors import ConfigError, ForeignStoreError, IndexMismatchError, StoreCorruptError, StoreError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import score_matrix
from tda.scorers import TRAKScorer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _problem(n: int = 1500, m_count: int = 2, k: int = 16, queries: int = 30, seed: int = 0):
    """Clustered features with a decaying spectrum, varying norms and Q in (0, 1): TRAK's shape."""
    rng = np.random.default_rng(seed)
    spec = np.geomspace(3, 0.05, k)
    centres = rng.standard_normal((m_count, 12, k)) * spec

    def draw(rows: int) -> np.ndarray:
        lab = rng.integers(0, 12, rows)
        x = centres[:, lab] + 0.5 * rng.standard_normal((m_count, rows, k)) * spec
        return (x * np.exp(0.5 * rng.standard_normal(rows))[None, :, None]).astype(np.float32)

    q = rng.beta(0.5, 2.0, (m_count, n)).astype(np.float32)
    train = ArrayFeatures(FeatureBlock(np.arange(n, dtype=np.int64) + 500, draw(n), q), range(m_count))
    query = FeatureBlock(np.arange(queries, dtype=np.int64), draw(queries), np.ones((m_count, queries), np.float32))
    return train, query


def test_whitened_trak_scores_equal_the_unwhitened_form():
    train, query = _problem()
    scorer = TRAKScorer(lambda_rel=0.05).fit(train)
    got = score_matrix(query, scorer, train)  # (m, n) through the whitened transforms
    blk, m_count = train.block, train.block.feats.shape[0]
    ref = 0.0  # the form indexed before: phi_i * Qbar_i / M against K^-1 phi(z), float64
    for c in range(m_count):
        phi = blk.feats[c].astype(np.float64)
        kern = phi.T @ phi + scorer.lambdas[c] * np.eye(phi.shape[1])
        ref = ref + query.feats[c].astype(np.float64) @ np.linalg.solve(kern, phi.T)
    ref = ref * blk.q.astype(np.float64).mean(axis=0) / m_count
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert scorer.index_space == "whitened"
    t = scorer.transform_train(blk)  # both sides whitened: the query side is L^-1 phi(z), no K^-1
    chol = scorer.chol[0]
    np.testing.assert_allclose(chol @ scorer.transform_query(query)[:, :16].T, query.feats[0].T, rtol=1e-4, atol=1e-4)
    assert t.dtype == np.float32 and t.shape == (len(blk), m_count * 16)
    top = build_index(train, scorer).top_k(scorer.transform_query(query), 5)  # the flat index: exact TRAK top-k
    np.testing.assert_allclose(top.proponent_scores, -np.sort(-ref, 1)[:, :5], rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(top.opponent_scores, np.sort(ref, 1)[:, :5], rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind,settings,least", [
    ("flat", {}, 1.0),
    ("pruned", {}, 1.0),  # exact: stops each query at the Cauchy-Schwarz bound
    ("ivf", {"nlist": 16, "nprobe": 16}, 1.0),  # every cell probed: exact
    ("ivf", {"nlist": 16, "nprobe": 8}, 0.9),
    ("hnsw", {"hnsw_m": 32, "ef_construction": 200, "ef_search": 200}, 0.98),
])
def test_each_kind_finds_the_brute_force_top_k(kind, settings, least):
    train, query = _problem(seed=1)
    scorer = TRAKScorer(lambda_rel=0.05).fit(train)
    qv = scorer.transform_query(query)
    dense = score_matrix(query, scorer, train)
    index = build_index(train, scorer, kind, block_rows=256, recall_queries=qv, recall_k=10, **settings)
    top = index.top_k(qv, 10)
    ids = train.ids
    for found, order in ((top.proponent_ids, np.argsort(-dense, 1)), (top.opponent_ids, np.argsort(dense, 1))):
        exact = ids[order[:, :10]]
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
        assert recall >= least, (kind, settings, recall)
    if kind == "pruned":  # the same answers as flat search, scores included
        flat = build_index(train, scorer, "flat").top_k(qv, 10)
        np.testing.assert_array_equal(top.proponent_ids, flat.proponent_ids)
        np.testing.assert_allclose(top.opponent_scores, flat.opponent_scores, rtol=1e-5, atol=1e-7)
    rec = index.meta["recall"]  # measured in the build pass, on the same queries
    assert rec["k"] == 10 and rec["queries"] == len(qv) and rec["recall"] >= least - 0.02
    assert index.meta["kind"] == kind and index.meta["space"] == "whitened"


def test_recall_at_k_counts_ties_and_ignores_padding():
    exact_ids, exact_s = np.array([[1, 2, 3]]), np.array([[3.0, 2.0, 1.0]])
    assert recall_at_k(np.array([[1, 2, 3]]), exact_s, exact_ids, exact_s)[0] == 1.0
    assert recall_at_k(np.array([[1, 2, 9]]), np.array([[3.0, 2.0, 1.0]]), exact_ids, exact_s)[0] == 1.0  # a tie
    assert recall_at_k(np.array([[1, 9, -1]]), np.array([[3.0, 0.5, -np.inf]]), exact_ids, exact_s)[0] == 1 / 3
    ref = ExactTopK(np.array([[1.0, 0.0]]), 2)
    ref.update(np.array([5, 6, 7]), np.array([[1.0, 0], [3.0, 0], [-2.0, 0]]))
    s, i = ref.result()
    assert i.tolist() == [[6, 5], [7, 5]] and s.tolist() == [[3.0, 1.0], [2.0, -1.0]]  # proponents, opponents


def test_tda_run_records_recall_and_warns_when_it_is_low(tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    meta = json.loads((run / "index" / "index.json").read_text())
    assert meta["kind"] == "flat" and meta["recall"]["recall"] == 1.0 and meta["recall"]["exact"]
    with caplog.at_level(logging.WARNING, logger="pipelines.stages.index"):
        assert main(["run", TINY, "--out", str(run), "--quiet", "--set", "index.kind=ivf", "--set", "index.nlist=60",
                     "--set", "index.nprobe=1"]) == 0
    rec = json.loads((run / "index" / "index.json").read_text())["recall"]
    assert rec["k"] == 5 and rec["queries"] == 20 and rec["recall"] < 0.95  # 1 of 60 cells probed
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "recall@5" in text and "raise index.nprobe (now 1 of nlist 60" in text and "index.kind: flat" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.stages.index"):
        assert main(["run", TINY, "--out", str(run), "--quiet", "--set", "index.kind=hnsw",
                     "--set", "index.ef_search=200"]) == 0
    rec = json.loads((run / "index" / "index.json").read_text())["recall"]
    assert rec["recall"] >= 0.95 and not [r for r in caplog.records if "recall@" in r.getMessage()]


def test_low_hnsw_recall_warning_names_ef_search(caplog):
    rng = np.random.default_rng(2)
    n, k = 3000, 32
    train = ArrayFeatures(FeatureBlock(np.arange(n), rng.standard_normal((1, n, k)).astype(np.float32),
                                       np.ones((1, n), np.float32)), [0])
    scorer = TRAKScorer(lambda_rel=0.1).fit(train)
    q = scorer.transform_query(FeatureBlock(np.arange(40), rng.standard_normal((1, 40, k)).astype(np.float32),
                                            np.ones((1, 40), np.float32)))
    index = build_index(train, scorer, "hnsw", hnsw_m=2, ef_construction=4, ef_search=1, recall_queries=q)
    assert index.meta["recall"]["recall"] < 0.95
    with caplog.at_level(logging.WARNING, logger="pipelines.stages.index"):
        _warn_recall(index)
    assert "raise index.ef_search (now 1)" in caplog.text and "index.hnsw_m (now 2)" in caplog.text


def test_an_index_of_the_unwhitened_space_is_rebuilt_or_refused(tmp_path):
    run = tmp_path / "run"
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0
    meta_path = run / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    assert meta["space"] == "whitened"
    del meta["space"]  # as an older tda wrote it: phi_i Q_i, answering K^-1 phi(z) queries
    meta_path.write_text(json.dumps(meta))
    cfg = load_config(TINY, [])
    with pytest.raises(IndexMismatchError, match="older tda.*--from index"):
        load_index(cfg, RunPaths(run), dim=meta["dim"], n_train=meta["n"])
    assert main(["run", TINY, "--out", str(run), "--quiet"]) == 0  # the index stage rebuilds it
    assert json.loads(meta_path.read_text())["space"] == "whitened"


def test_pruned_index_round_trip_and_equal_norms(tmp_path):
    train, query = _problem(n=700, seed=3)
    scorer = TRAKScorer(lambda_rel=0.05).fit(train)
    qv = scorer.transform_query(query)
    pruned = build_index(train, scorer, "pruned", block_rows=100)
    pruned.save(tmp_path / "p")
    again = FaissIndex.load(tmp_path / "p")
    flat = build_index(train, scorer, "flat").top_k(qv, 7)
    for got in (pruned.top_k(qv, 7), again.top_k(qv, 7)):
        np.testing.assert_array_equal(got.proponent_ids, flat.proponent_ids)
        np.testing.assert_array_equal(got.opponent_ids, flat.opponent_ids)
    unit = np.eye(8, dtype=np.float32)[np.arange(300) % 8] * np.float32(2.0)  # equal norms: nothing is pruned
    plain = FaissIndex.build([(np.arange(300), unit)], 8, "pruned")
    s, i = plain.search(np.ones((2, 8), np.float32), 300)
    assert sorted(i[0].tolist()) == list(range(300)) and np.all(s == 2.0)


def test_damaged_or_foreign_hnsw_index_is_a_clear_error(tmp_path):
    train, query = _problem(n=400)
    scorer = TRAKScorer(lambda_rel=0.05).fit(train)
    qv = scorer.transform_query(query)
    index = build_index(train, scorer, "hnsw", ef_search=48)
    index.save(tmp_path / "ok")
    again = FaissIndex.load(tmp_path / "ok")  # round trip keeps ef_search and the answers
    assert again.meta["ef_search"] == 48 and again.meta["kind"] == "hnsw"
    np.testing.assert_array_equal(again.top_k(qv, 5).proponent_ids, index.top_k(qv, 5).proponent_ids)
    raw = (tmp_path / "ok" / "index.faiss").read_bytes()
    (tmp_path / "ok" / "index.faiss").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StoreCorruptError, match="sha256.*rebuild"):
        FaissIndex.load(tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / "index.json").read_text())
    (tmp_path / "ok" / "index.json").write_text(json.dumps({**meta, "sha256": None}))
    with pytest.raises(StoreCorruptError, match="cannot be read by FAISS"):
        FaissIndex.load(tmp_path / "ok")
    (tmp_path / "ok" / "index.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ForeignStoreError, match="not written by tda"):
        FaissIndex.load(tmp_path / "ok")
    with pytest.raises(StoreError, match="unknown.*hnsw"):
        build_index(train, scorer, "annoy")
    with pytest.raises(ConfigError, match="index.kind"):
        parse_config({"index": {"kind": "annoy"}})
    with pytest.raises(ConfigError, match="index.ef_search"):
        parse_config({"index": {"kind": "hnsw", "ef_search": 0}})
