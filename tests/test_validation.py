"""Validator: LDS against hand computation, folds, subsets, resume and dask == local."""

import time

import numpy as np
import pytest
from scipy.stats import spearmanr

from pipelines.executors import DaskExecutor, LocalExecutor, make_executor
from pipelines.ground_truth import GroundTruth, GroundTruthSpec, ResultStore
from tda.errors import ConfigError, FingerprintMismatchError, ShapeError
from tda.validation import (bootstrap_ci, brittleness, ground_truth_reliability, lds, removal_sets, sample_subsets, score_noise,
                            spearman_columns, split_folds)


def test_lds_equals_hand_computation():
    # 2 queries, 4 training examples, 4 subsets
    scores = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 1.0, -1.0]])
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    outputs = np.array([[0.1, 5.0], [-3.0, 4.0], [2.0, 1.0], [1.5, 0.5]])
    # predictions by hand: query 0 -> [-1, -1.5, 4, 3.5]; query 1 -> [1, 2, -1, 0]
    # ranks q0 pred [2, 1, 4, 3] vs outputs [2, 1, 4, 3] -> 1.0 ; q1 pred [3, 4, 1, 2] vs out [4, 3, 2, 1] -> 0.6
    res = lds(scores, masks, outputs, n_boot=200)
    np.testing.assert_allclose(res.per_query, [1.0, 0.6])
    assert res.mean == pytest.approx(0.8) and res.n_undefined == 0
    assert res.ci_low <= res.mean <= res.ci_high
    for q in range(2):
        pred = masks.astype(float) @ scores[q]
        assert res.per_query[q] == pytest.approx(spearmanr(pred, outputs[:, q]).statistic)


def test_lds_counts_undefined_and_checks_shapes():
    scores = np.array([[1.0, 2.0], [0.0, 0.0]])
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    outputs = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    res = lds(scores, masks, outputs)
    assert res.n_undefined == 1 and np.isnan(res.per_query[1]) and res.mean == pytest.approx(res.per_query[0])
    with pytest.raises(ShapeError):
        lds(scores, masks, outputs[:, :1])


def test_bootstrap_ci_brackets_mean_and_is_seeded():
    v = np.random.default_rng(0).normal(0.3, 0.1, 200)
    lo, hi = bootstrap_ci(v, seed=1)
    assert lo < v.mean() < hi and hi - lo < 0.05
    assert (lo, hi) == bootstrap_ci(v, seed=1)


def test_subsets_are_seeded_and_exact_size():
    a = sample_subsets(101, 7, 0.5, seed=3)
    assert a.shape == (7, 101) and (a.sum(1) == 50).all()
    np.testing.assert_array_equal(a, sample_subsets(101, 7, 0.5, seed=3))
    assert not np.array_equal(a, sample_subsets(101, 7, 0.5, seed=4))
    with pytest.raises(ConfigError):
        sample_subsets(10, 3, alpha=1.0)


def test_folds_never_overlap():
    f = split_folds(50, 40, 0.5, seed=0)
    assert not set(f["tune_queries"]) & set(f["report_queries"])
    assert not set(f["tune_subsets"]) & set(f["report_subsets"])
    assert len(f["tune_queries"]) + len(f["report_queries"]) == 50
    assert len(f["tune_subsets"]) + len(f["report_subsets"]) == 40


def test_removal_sets_and_brittleness():
    s = np.array([0.5, -1.0, 2.0, 0.0, 1.0])
    assert removal_sets(s, 2, "top").tolist() == [2, 4]
    assert removal_sets(s, 2, "bottom").tolist() == [1, 3]
    r = removal_sets(s, 3, "random", seed=1)
    assert len(set(r.tolist())) == 3 and r.tolist() == removal_sets(s, 3, "random", seed=1).tolist()
    flips = np.array([[False, True, True], [False, False, False], [True, True, True]])
    assert brittleness(flips, np.array([10, 20, 40])).tolist() == [20, -1, 10]


def test_score_noise():
    rng = np.random.default_rng(0)
    signal_ = np.zeros((3, 20))
    signal_[:, :5] = 10.0
    stack = signal_[None] + rng.normal(0, 1, (6, 3, 20))
    rep = score_noise(stack)
    assert rep.snr[:, :5].min() > 3 and 0.2 <= rep.share_distinguishable <= 0.45
    with pytest.raises(ShapeError):
        score_noise(stack[:1])


class ToyJob:
    """Picklable stand-in for a retraining: output = sum of kept 'effects', seeded noise."""

    def __init__(self, effects: np.ndarray, delay: float = 0.0) -> None:
        self.effects, self.delay = effects, delay

    def __call__(self, task):
        rows, seed = task
        time.sleep(self.delay)
        noise = np.random.default_rng(seed).normal(0, 0.01, self.effects.shape[0])
        return self.effects[:, rows].sum(axis=1) + noise


def _spec(**kw):
    return GroundTruthSpec(n=30, m=4, n_subsets=12, models_per_subset=2, alpha=0.5, seed=5, job="toy", **kw)


def test_ground_truth_recovers_linear_model(tmp_path):
    effects = np.random.default_rng(0).normal(size=(4, 30))
    gt = GroundTruth(tmp_path / "gt", _spec())
    gt.compute(ToyJob(effects), LocalExecutor(), progress=False)
    out = gt.mean_outputs()
    assert out.shape == (12, 4) and gt.outputs().shape == (12, 2, 4)
    assert lds(effects, gt.masks, out).mean > 0.99  # exact attribution of a linear model
    assert lds(-effects, gt.masks, out).mean < -0.99  # a sign flip shows up as negative LDS


def test_ground_truth_resume_equals_uninterrupted(tmp_path):
    effects = np.random.default_rng(1).normal(size=(4, 30))
    full = GroundTruth(tmp_path / "full", _spec())
    full.compute(ToyJob(effects), LocalExecutor(), progress=False)
    partial = GroundTruth(tmp_path / "partial", _spec())

    class Stop(Exception):
        pass

    class Interrupting(LocalExecutor):
        def map_unordered(self, fn, items):
            for i, pair in enumerate(super().map_unordered(fn, items)):
                if i == 7:
                    raise Stop
                yield pair

    with pytest.raises(Stop):
        partial.compute(ToyJob(effects), Interrupting(), progress=False)
    assert len(partial.pending()) == 24 - 7
    calls = []

    class Counting(LocalExecutor):
        def map_unordered(self, fn, items):
            items = list(items)
            calls.append(len(items))
            yield from super().map_unordered(fn, items)

    GroundTruth(tmp_path / "partial", _spec()).compute(ToyJob(effects), Counting(), progress=False)
    assert calls == [17]  # only the missing retrainings ran: nothing lost, nothing duplicated
    np.testing.assert_array_equal(GroundTruth(tmp_path / "partial", _spec()).outputs(), full.outputs())


def test_ground_truth_refuses_other_spec(tmp_path):
    GroundTruth(tmp_path / "gt", _spec())
    with pytest.raises(FingerprintMismatchError):
        GroundTruth(tmp_path / "gt", GroundTruthSpec(n=30, m=4, n_subsets=13, seed=5, job="toy"))


@pytest.mark.dask
def test_dask_executor_equals_local(tmp_path):
    effects = np.random.default_rng(2).normal(size=(4, 30))
    local = GroundTruth(tmp_path / "local", _spec())
    local.compute(ToyJob(effects), LocalExecutor(), progress=False)
    remote = GroundTruth(tmp_path / "dask", _spec())
    with make_executor("dask", workers=2) as ex:
        assert isinstance(ex, DaskExecutor)
        remote.compute(ToyJob(effects), ex, progress=False)
    np.testing.assert_array_equal(remote.outputs(), local.outputs())


def test_result_store_rejects_bad_output(tmp_path):
    store = ResultStore(tmp_path / "r", {"x": 1}, width=3)

    def bad(task):
        return np.array([1.0, np.nan, 2.0])

    from tda.errors import StoreCorruptError
    with pytest.raises(StoreCorruptError, match="non-finite"):
        store.run(bad, [("a", (np.arange(2), 0))], LocalExecutor(), progress=False)
    assert not store.done("a")


def test_damaged_retraining_results_are_recomputed_or_refused(tmp_path):
    effects = np.random.default_rng(3).normal(size=(4, 30))
    gt = GroundTruth(tmp_path / "gt", _spec())
    gt.compute(ToyJob(effects), LocalExecutor(), progress=False)
    want = gt.outputs()
    runs = sorted((tmp_path / "gt" / "runs").glob("*.npy"))
    np.save(runs[0], np.zeros(4))  # a valid .npy with other numbers: only its sha256 tells
    runs[1].write_bytes(runs[1].read_bytes()[:20])  # truncated
    runs[2].unlink()
    from tda.errors import StoreCorruptError
    with pytest.raises(StoreCorruptError, match="sha256; rerun"):
        GroundTruth(tmp_path / "gt", _spec()).outputs()
    again = GroundTruth(tmp_path / "gt", _spec())
    assert len(again.store.drop_damaged()) == 3 and len(again.pending()) == 3
    again.compute(ToyJob(effects), LocalExecutor(), progress=False)
    np.testing.assert_array_equal(GroundTruth(tmp_path / "gt", _spec()).outputs(), want)


def test_ground_truth_reliability_matches_the_attenuation_of_a_known_signal() -> None:
    """Outputs = signal + seed noise with known variances: single-model agreement is the
    signal share (Pearson ~ Spearman here), Spearman-Brown gives the R-model reliability, and
    the true signal itself scores LDS about sqrt(reliability) against the R-model mean."""
    rng = np.random.default_rng(0)
    J, R, m, noise = 400, 4, 40, 1.0
    signal = rng.normal(size=(J, 1, m))
    outputs = signal + noise * rng.normal(size=(J, R, m))
    rel = ground_truth_reliability(outputs)
    share = 1 / (1 + noise ** 2)  # 0.5
    assert abs(float(np.mean(rel.single)) - share) < 0.04
    expect = R * share / (1 + (R - 1) * share)  # 0.8
    assert abs(float(np.mean(rel.reliability)) - expect) < 0.03
    oracle = spearman_columns(signal[:, 0], outputs.mean(axis=1))
    assert abs(rel.ceiling - float(np.mean(oracle))) < 0.03
    with pytest.raises(ShapeError, match="models_per_subset >= 2"):
        ground_truth_reliability(outputs[:, :1])
