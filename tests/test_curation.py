"""Curation (issue 13): seeded label noise, self-influence against explicit formulas, detection
metrics against brute-force definitions, and ``tda curate`` end to end (outputs, resume, errors)."""

from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from tda.workflows.curation import (average_precision, detection_metrics, flip_labels, found_at, rank_average, roc_auc,
                          self_influence, shuffle_sequences)
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.scorers import GradDotScorer, TracInCPScorer, TRAKScorer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
NOISY = ["--set", "data.label_noise=0.1", "--set", "featurize.shard_size=64"]


def test_flip_labels_moves_a_seeded_share_to_other_classes() -> None:
    labels = np.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.2, seed=3, n_classes=10)
    assert flipped.sum() == 200 and (noisy[flipped] != labels[flipped]).all() and (noisy[~flipped] == labels[~flipped]).all()
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, _ = flip_labels(labels, 0.2, seed=3, n_classes=10)
    other, _ = flip_labels(labels, 0.2, seed=4, n_classes=10)
    assert (again == noisy).all() and not (other == noisy).all()
    shift = (noisy[flipped] - labels[flipped]) % 10  # uniform over the 9 other classes
    assert set(np.unique(shift)) == set(range(1, 10))


def test_detection_metrics_equal_their_brute_force_definitions() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # ties on purpose
    positive = rng.random(60) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in product(scores[positive], scores[~positive])]
    assert roc_auc(scores, positive) == pytest.approx(np.mean(pairs))
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    ap = np.mean([hits[: i + 1].mean() for i in range(60) if hits[i]])
    assert average_precision(scores, positive) == pytest.approx(ap)
    f = found_at(np.arange(100.0), np.arange(100) >= 90)  # the 10 positives rank first
    assert f == {"5%": 0.5, "10%": 1.0, "20%": 1.0}
    assert detection_metrics(-np.arange(10.0), np.arange(10) < 3)["auc"] == 1.0
    r = rank_average([np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])])
    assert np.allclose(r, 0.5)


def _features(seed: int = 0) -> tuple[FeatureBlock, ArrayFeatures]:
    rng = np.random.default_rng(seed)
    block = FeatureBlock(np.arange(40), rng.normal(size=(2, 40, 8)).astype(np.float32),
                         rng.uniform(0.2, 1.0, size=(2, 40)).astype(np.float32))
    return block, ArrayFeatures(block, [0, 1])


def test_self_influence_equals_the_explicit_formulas() -> None:
    block, src = _features()
    phi, q = block.feats.astype(np.float64), block.q.astype(np.float64)
    trak = TRAKScorer(lambda_rel=0.1).fit(src)
    _, got = self_influence(trak, src, block_rows=7)
    want = np.zeros(40)
    for m in range(2):
        inv = np.linalg.inv(phi[m].T @ phi[m] + trak.lambdas[m] * np.eye(8))
        want += np.einsum("ik,kl,il->i", phi[m], inv, phi[m]) * q.mean(0) / 2
    np.testing.assert_allclose(got, want, rtol=1e-4)
    _, tracin = self_influence(TracInCPScorer([0.5, 0.25]).fit(src), src)
    np.testing.assert_allclose(tracin, 0.5 * (phi[0] ** 2).sum(1) + 0.25 * (phi[1] ** 2).sum(1), rtol=1e-4)
    _, dot = self_influence(GradDotScorer().fit(src), src)
    assert np.corrcoef(dot, (phi ** 2).sum(2).mean(0))[0, 1] > 0.9999


def test_loss_self_influence_equals_the_explicit_formulas() -> None:
    """Of the loss: features Q phi (Q then 1); TracIn sum_c eta_c Q_c^2 ||phi_c||^2, TRAK refitted on
    the Q-scaled features with Q = 1 (an explicit inverse), the fitted scorer left as it was."""
    from tda.workflows.curation import loss_self_influence

    block, src = _features()
    phi, q = block.feats.astype(np.float64), block.q.astype(np.float64)
    _, tracin = loss_self_influence(TracInCPScorer([0.5, 0.25]).fit(src), src, block_rows=7)
    want = 0.5 * q[0] ** 2 * (phi[0] ** 2).sum(1) + 0.25 * q[1] ** 2 * (phi[1] ** 2).sum(1)
    np.testing.assert_allclose(tracin, want, rtol=1e-4)
    trak = TRAKScorer(lambda_rel=0.1).fit(src)
    before = trak.lambdas.copy()
    _, got = loss_self_influence(trak, src)
    np.testing.assert_array_equal(trak.lambdas, before)  # the caller's scorer is not refitted
    want = np.zeros(40)
    for m in range(2):
        g = phi[m] * q[m][:, None]
        lam = 0.1 * np.trace(g.T @ g) / g.shape[1]  # lambda_rel x the mean diagonal of G^T G
        want += np.einsum("ik,kl,il->i", g, np.linalg.inv(g.T @ g + lam * np.eye(8)), g) / 2
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_curate_finds_flipped_labels_writes_outputs_and_resumes(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = [str(TINY), "--out", str(run), *NOISY]
    assert main(["run", *args, "--quiet"]) == 0
    check = ["--set", "curate.retrain_seeds=2", "--set", "curate.remove_fraction=0.1"]
    assert main(["curate", *args, *check, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "30 labels flipped" in out and "ROC-AUC" in out and "without flagged" in out
    res = json.loads((run / "curation" / "curation.json").read_text())
    assert set(res["methods"]) == {"trak", "tracin", "graddot", "loss", "confidence", "trak+loss", "trak+loss+confidence"}
    assert res["label_noise"]["flipped"] == 30
    for name, m in res["methods"].items():
        assert 0.5 < m["auc"] <= 1.0, name  # every method beats chance on a 2-epoch tiny run
        assert set(m["found_at"]) == {"5%", "10%", "20%"}
    assert res["methods"]["confidence"]["auc"] > 0.8
    # the default self-influence is of the loss: TracIn's column is sum_c eta_c Q_c,i^2 ||phi_c,i||^2
    from stores import FeatureStore
    from tda.core.features import concat_blocks

    block = concat_blocks(list(FeatureStore.open(run / "features-train").iter_blocks()))
    from pipelines.config import parse_config
    from pipelines.families import family_for
    from pipelines.layout import RunPaths

    cfg = parse_config(json.loads((run / "run.json").read_text())["config"])
    etas = family_for(cfg).learning_rates(cfg, RunPaths(run))
    phi, q = block.feats.astype(np.float64), block.q.astype(np.float64)
    want = dict(zip(block.ids.tolist(), sum(e * q[c] ** 2 * (phi[c] ** 2).sum(1) for c, e in enumerate(etas))))
    with open(run / "curation" / "ranking.csv") as fh:
        got = {int(r["id"]): float(r["tracin"]) for r in csv.DictReader(fh)}
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=1e-3)
    assert res["check"]["removed"] == 30 and len(res["check"]["accuracy"]["flagged"]["per_seed"]) == 2
    with open(run / "curation" / "ranking.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 300 and [int(r["rank"]) for r in rows] == list(range(1, 301))
    lead = [float(r["trak+loss+confidence"]) for r in rows]
    assert lead == sorted(lead, reverse=True)
    flipped = sum(r["flipped"] == "true" for r in rows)
    assert flipped == 30
    # resume: a lost retraining is redone alone; a changed check starts afresh
    done = sorted((run / "curation" / "retrain").glob("*.npy"))
    assert len(done) == 4
    keep = {p.name: p.stat().st_mtime_ns for p in done}
    done[0].unlink()
    assert main(["curate", *args, *check, "--quiet"]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in (run / "curation" / "retrain").glob("*.npy")}
    assert set(again) == set(keep) and sum(again[k] != keep[k] for k in keep) == 1
    res2 = json.loads((run / "curation" / "curation.json").read_text())
    for arm in ("flagged", "random"):
        assert res2["check"]["accuracy"][arm]["per_seed"] == pytest.approx(res["check"]["accuracy"][arm]["per_seed"])
    other = ["--set", "curate.retrain_seeds=2", "--set", "curate.remove_fraction=0.2"]
    assert main(["curate", *args, *other, "--quiet"]) == 0
    fresh = {p.name: p.stat().st_mtime_ns for p in (run / "curation" / "retrain").glob("*.npy")}
    assert all(fresh[k] != again[k] for k in fresh)
    assert json.loads((run / "curation" / "curation.json").read_text())["check"]["removed"] == 60
    capsys.readouterr()


def test_curate_refuses_bad_settings_and_unfinished_runs(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    # an unfinished (here: absent) run is run first, stage by stage, then curated
    assert main(["curate", str(TINY), "--out", str(run), *NOISY, "--set", "curate.retrain_seeds=0", "--quiet"]) == 0
    assert "running the stages it needs first" in capsys.readouterr().err
    assert (run / "scores" / "scores.json").is_file() and (run / "curation" / "curation.json").is_file()
    assert main(["run", str(TINY), "--out", str(run), *NOISY, "--quiet"]) == 0
    assert main(["curate", str(TINY), "--out", str(run), *NOISY, "--set", "curate.method=trek"]) == 2
    assert "curate.method is 'trek'" in capsys.readouterr().err
    assert main(["curate", str(TINY), "--out", str(run), *NOISY, "--set", "curate.methods=[loss]"]) == 2
    assert "curate.method 'trak+loss+confidence' cannot be computed" in capsys.readouterr().err
    assert main(["curate", str(TINY), "--out", str(run), *NOISY, "--set", "curate.methods=[loss]",
                 "--set", "curate.method=loss", "--set", "curate.retrain_seeds=0", "--quiet"]) == 0
    res = json.loads((run / "curation" / "curation.json").read_text())
    assert list(res["methods"]) == ["loss"] and "check" not in res
    assert main(["run", str(TINY), "--out", str(tmp_path / "bad"), "--set", "data.label_noise=1.5"]) == 2
    assert "data.label_noise must be in [0, 1)" in capsys.readouterr().err


def test_shuffle_sequences_permutes_a_seeded_share() -> None:
    tokens = np.arange(40 * 8).reshape(40, 8) % 13
    noisy, changed = shuffle_sequences(tokens, 0.25, seed=3)
    assert changed.sum() == 10 and np.array_equal(noisy[~changed], tokens[~changed])
    assert all(sorted(noisy[r]) == sorted(tokens[r]) for r in range(40))  # same tokens, another order
    again, _ = shuffle_sequences(tokens, 0.25, seed=3)
    assert np.array_equal(again, noisy)
    same = np.zeros((4, 5), dtype=int)
    assert not shuffle_sequences(same, 0.5, seed=0)[1].any()  # a permutation that changes nothing is no noise


def test_curate_a_language_model_finds_shuffled_sequences(tmp_path, capsys) -> None:
    lm = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_lm.yaml"
    run = tmp_path / "lm"
    args = [str(lm), "--out", str(run), "--set", "data.train_size=120", "--set", "train.epochs=2",
            "--set", "featurize.k=64", "--set", "data.label_noise=0.1", "--quiet"]
    assert main(["run", *args]) == 0
    assert main(["curate", *args, "--set", "curate.retrain_seeds=1"]) == 0
    out = capsys.readouterr().out
    assert "12 sequences shuffled" in out and "completion log-probability" in out
    res = json.loads((run / "curation" / "curation.json").read_text())
    assert res["label_noise"]["flipped"] == 12
    assert {"trak", "loss", "confidence", "trak+loss+confidence"} <= set(res["methods"])
    assert res["methods"]["loss"]["auc"] > 0.6  # shuffled text is hard to predict
    check = res["check"]
    assert check["metric"] == "log_prob" and check["removed"] == 12
    assert np.isfinite(check["log_prob"]["flagged"]["mean"]) and check["log_prob"]["flagged"]["mean"] < 0
    with open(run / "curation" / "ranking.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 120 and {r["label"] for r in rows} == {"-1"}
    page = (run / "report.html").read_text()
    assert "Curation" in page and "label -1" not in page


def test_curate_takes_ekfac_self_influence_equal_to_the_python_api(tmp_path, monkeypatch) -> None:
    """With ``score.scorer: ekfac`` the ranking holds EK-FAC self-influence, the diagonal of
    EKFACAttributor's scores of the training set against itself on the same checkpoints; the
    factors the run fitted are stored and reused by curate (not refitted), and a damaged factor
    file is refitted."""
    import torch

    from pipelines.methods.ekfac import _stored_factors, factors_file, factors_key
    from pipelines.run import feature_fingerprint
    from pipelines.layout import RunPaths
    from tda.scorers.ekfac.factors import EKFACFactors

    from pipelines.config import parse_config
    from pipelines.families import family_for
    from tda.scorers.ekfac.features import EKFACAttributor

    run = tmp_path / "run"
    sets = [*NOISY, "--set", "score.scorer=ekfac", "--set", "featurize.projection=factored", "--set",
            "featurize.k_in=8", "--set", "featurize.k_out=8", "--set", "train.models=1", "--set", "curate.retrain_seeds=0",
            "--set", "curate.method=ekfac",
            "--set", "data.train_size=120", "--quiet"]
    assert main(["run", str(TINY), "--out", str(run), *sets]) == 0
    assert factors_file(RunPaths(run)).is_file()

    def refit(*args, **kwargs):
        raise AssertionError("the stored EK-FAC factors were refitted")

    with monkeypatch.context() as m:
        m.setattr(EKFACFactors, "fit", classmethod(refit))
        assert main(["curate", str(TINY), "--out", str(run), *sets]) == 0
    res = json.loads((run / "curation" / "curation.json").read_text())
    assert {"ekfac", "loss", "confidence"} <= set(res["methods"]) and 0 <= res["methods"]["ekfac"]["auc"] <= 1
    cfg = parse_config(json.loads((run / "run.json").read_text())["config"])
    family = family_for(cfg)
    entries = json.loads((run / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    states = [torch.load(run / "checkpoints" / e["file"], weights_only=True) for e in entries]
    train = family.datasets(cfg)["train"]
    attr = EKFACAttributor(family.build_model(cfg), states, family.collate(cfg), task=family.task(cfg), k_in=8,
                           k_out=8, batch_size=cfg.featurize.batch_size).fit(train)
    want = np.diag(attr.scores(train))
    with open(run / "curation" / "ranking.csv") as fh:
        got = {int(r["id"]): float(r["ekfac"]) for r in csv.DictReader(fh)}
    ids = np.asarray(train["id"]) if "id" in train.column_names else np.arange(len(train))
    np.testing.assert_allclose([got[int(i)] for i in ids], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert (want > 0).mean() > 0.9  # H is positive definite: self-influence is positive
    key = factors_key(feature_fingerprint(cfg, "train"), entries)
    assert _stored_factors(RunPaths(run), key) is not None and _stored_factors(RunPaths(run), "other") is None
    with open(factors_file(RunPaths(run)), "r+b") as fh:  # one byte flipped: the digest no longer matches
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 1]))
    assert _stored_factors(RunPaths(run), key) is None
