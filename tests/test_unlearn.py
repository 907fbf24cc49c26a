"""Unlearning (issue 13): the forget set is the top-k by attributed group effect, predictions are the
linear datamodel's (calibrated once ``tda validate`` has run), and the retraining check resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from pipelines.config import parse_config
from pipelines.workflows.unlearn import forget_set, predictions

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SETS = ["--set", "featurize.shard_size=64"]


def test_forget_set_takes_k_or_reaches_the_target() -> None:
    scores = np.array([[3.0, -1.0, 0.5, 2.0, 0.0], [1.0, 0.0, 0.5, 1.0, -2.0]])  # (group queries, train)
    effect = scores.sum(axis=0)  # [4, -1, 1, 3, -2]
    assert forget_set(effect, scores, parse_config({"unlearn": {"k": 2}})).tolist() == [0, 3]
    # predicted group change after the top 1, 2, 3: -4, -7, -8
    assert forget_set(effect, scores, parse_config({"unlearn": {"target_change": -6.5}})).tolist() == [0, 3]
    assert forget_set(effect, scores, parse_config({"unlearn": {"target_change": 2.5}})).tolist() == [1, 4]  # raise it
    with pytest.raises(Exception, match="no forget set reaches"):
        forget_set(effect, scores, parse_config({"unlearn": {"target_change": -100.0}}))
    p = predictions(scores, np.array([0, 3]), {"intercept": 0.5, "slope": 2.0, "group_size": 2})
    assert p["per_query"] == [-5.0, -2.0] and p["group"] == -7.0
    assert p["calibrated"]["per_query"] == [-9.5, -3.5] and p["calibrated"]["group"] == -13.0
    half = predictions(scores, np.array([0, 3]), {"intercept": 0.5, "slope": 2.0, "group_size": 4})
    assert half["calibrated"]["per_query"] == [-9.75, -3.75]  # the intercept scales with the rows removed


def test_unlearn_predicts_checks_by_retraining_and_calibrates_after_validate(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = [str(TINY), "--out", str(run), *SETS]
    assert main(["run", *args, "--quiet"]) == 0
    check = ["--set", "unlearn.retrain_seeds=2", "--set", "unlearn.k=10", "--quiet"]
    assert main(["unlearn", *args, *check]) == 0
    out = capsys.readouterr().out
    assert "uncalibrated" in out and "actual change" in out
    res = json.loads((run / "unlearning" / "unlearning.json").read_text())
    scores = np.load(run / "scores" / "scores.npy")
    with np.load(run / "scores" / "topk.npz") as z:
        qids, tids = z["query_ids"].tolist(), z["train_ids"]
    rows = [qids.index(q) for q in res["group_query_ids"]]
    effect = scores[rows].sum(axis=0)
    assert sorted(res["forget_ids"]) == sorted(tids[np.argsort(-effect)[:10]].tolist())
    forget = [list(tids).index(i) for i in res["forget_ids"]]
    assert res["predicted"]["group"] == pytest.approx(-scores[np.ix_(rows, forget)].sum(), rel=1e-6)
    assert res["calibration"].startswith("uncalibrated")
    ch = res["check"]
    assert ch["seeds"] == 2 and ch["forget"]["actual_group"]["mean"] < 0  # removing proponents lowers the group
    assert ch["forget"]["accuracy"]["group"]["mean"] <= ch["full"]["accuracy"]["group"]["mean"]
    variants = res["approximate"]["variants"]
    assert set(variants) == {"original", "gradient difference", "masked gradient difference"}
    for m in variants.values():
        assert 0 <= m["membership_auc"] <= 1 and np.isfinite(m["output_distance_to_retrained"])
    assert variants["gradient difference"]["forget_loss"] > variants["original"]["forget_loss"]  # it forgot
    saved = {p.name: p.stat().st_mtime_ns for p in (run / "unlearning" / "retrain").glob("*.npy")}
    assert len(saved) == 6  # 3 arms x 2 seeds
    assert main(["validate", *args, "--set", "validate.subsets=6", "--set", "validate.plots=false", "--quiet"]) == 0
    assert main(["unlearn", *args, *check]) == 0
    again = json.loads((run / "unlearning" / "unlearning.json").read_text())
    fit = json.loads((run / "validation" / "validation.json").read_text())["scorers"]["trak"]["calibration"]["fit"]
    raw = np.array(again["predicted"]["per_query"])
    if fit["slope"] > 0 and fit["slope_ci"][0] > 0:  # scores that predict retraining: their line is applied
        scaled = fit["intercept"] * 10 / fit["group_size"]
        np.testing.assert_allclose(again["predicted"]["calibrated"]["per_query"], scaled + fit["slope"] * raw)
    else:  # a line through zero or below would flip signs (the tiny run's 6 subsets give one): not applied
        assert "calibrated" not in again["predicted"] and again["calibration"].startswith("uncalibrated")
    assert {p.name: p.stat().st_mtime_ns for p in (run / "unlearning" / "retrain").glob("*.npy")} == saved  # reused
    capsys.readouterr()


def test_unlearn_refuses_unknown_queries_and_missing_dense_scores(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = [str(TINY), "--out", str(run), *SETS]
    assert main(["unlearn", *args, "--set", "unlearn.retrain_seeds=0", "--set", "unlearn.approximate=false",
                 "--quiet"]) == 0  # an absent run is run first
    assert "running the stages it needs first" in capsys.readouterr().err
    assert main(["run", *args, "--quiet"]) == 0
    assert main(["unlearn", *args, "--set", "unlearn.queries=[999]"]) == 2
    assert "not among the run's 20 queries" in capsys.readouterr().err
    assert main(["unlearn", *args, "--set", "unlearn.query_class=42", "--set", "unlearn.retrain_seeds=0"]) == 2
    assert "no query has class 42" in capsys.readouterr().err
    assert main(["run", *args, "--set", "score.dense=false", "--quiet"]) == 0
    assert main(["unlearn", *args, "--set", "score.dense=false"]) == 2
    assert "score.dense: true" in capsys.readouterr().err


def _toy() -> tuple:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    ce = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    each = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none")  # noqa: E731
    return model, {"x": x[:8], "y": y[:8]}, {"x": x[8:], "y": y[8:]}, ce, each


def test_masked_gradient_difference_moves_only_masked_weights_and_stops_at_the_bound() -> None:
    import copy

    import torch

    from tda.workflows.unlearning import gradient_difference, membership_auc, weight_mask

    model, forget, retain, ce, each = _toy()
    mask = weight_mask(model, ce, forget, retain, 0.2)
    total = sum(m.numel() for m in mask.values())
    assert abs(sum(int(m.sum()) for m in mask.values()) - 0.2 * total) <= 2
    before = copy.deepcopy(model.state_dict())
    gradient_difference(model, ce, forget, retain, steps=5, lr=0.1, mask=mask)
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        assert not (moved & ~mask[name]).any()  # weights outside the mask never move
        assert moved.any() or not mask[name].any()
    free, bounded = copy.deepcopy(model), copy.deepcopy(model)
    gradient_difference(free, ce, forget, retain, steps=30, lr=0.5)
    gradient_difference(bounded, ce, forget, retain, steps=30, lr=0.5, forget_bound=1.5, example_loss=each)
    with torch.no_grad():
        assert float(ce(free, forget)) > 5.0  # unbounded ascent runs away
        assert float(each(bounded, forget).min()) < 3.0  # clamped examples stop near the bound
    assert membership_auc(np.array([0.1, 0.2]), np.array([1.0, 2.0])) == 1.0
    assert membership_auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5


def test_unlearn_a_language_model_completion_and_report_its_text(tmp_path, capsys) -> None:
    lm = Path(__file__).resolve().parents[1] / "configs" / "shakespeare_lm.yaml"
    run = tmp_path / "lm"
    args = [str(lm), "--out", str(run), "--set", "data.train_size=120", "--set", "train.epochs=1",
            "--set", "featurize.k=64", "--quiet"]
    assert main(["run", *args]) == 0
    assert main(["unlearn", *args, "--set", "unlearn.query_class=1"]) == 2
    assert "needs class labels" in capsys.readouterr().err
    assert main(["unlearn", *args, "--set", "unlearn.k=10", "--set", "unlearn.retrain_seeds=1"]) == 0
    res = json.loads((run / "unlearning" / "unlearning.json").read_text())
    assert res["behaviour"] == "query 0" and "log-probabilities" in res["output"] and res["k"] == 10
    assert "accuracy" not in res["check"]["forget"]
    approx = res["approximate"]["variants"]  # gradient difference on the LM: losses, no accuracies
    assert set(approx) == {"original", "gradient difference", "masked gradient difference"}
    for m in approx.values():
        assert "forget_accuracy" not in m and np.isfinite(m["forget_loss"]) and 0 <= m["membership_auc"] <= 1
        assert np.isfinite(m["output_distance_to_retrained"])
    assert approx["gradient difference"]["forget_loss"] > approx["original"]["forget_loss"]  # the ascent moved it
    assert np.isfinite(res["check"]["forget"]["actual_group"]["mean"])
    page = (run / "report.html").read_text()
    assert page.count('class="txt"') > 10 and " -&gt; " in page  # queries shown as prompt -> completion
    assert "predicted -1" not in page and ", predicted" not in page  # an LM has no classes to predict
    capsys.readouterr()
