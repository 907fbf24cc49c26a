"""The linearity check of ``tda validate`` when MAGIC is validated (issue 25, item 2).

References: exact lines for the statistic; for the command, the classifier recipe retrained
explicitly here (``train_classifier`` with the dropped rows at weight 0 and 0.5, the run's seed)
and the statistic computed from those outputs directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli.main import main
from pipelines.families.classifier import ClassifierSubsetJob
from pipelines.families.training import train_classifier
from tda.data.loading import DEMO_DATA
from tda.errors import ShapeError
from tda.models.tasks import classification_margin
from tda.validation import half_weight_linearity, sample_subsets

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
RUN = ["--set", f"data.root={DEMO_DATA / 'mnist'}", "--quiet", "--set", "train.models=1", "--set",
       "score.scorer=magic"]
CHECK = ["--set", "validate.protocol=small-drop", "--set", "validate.drop_fraction=0.05", "--set",
         "validate.subsets=6", "--set", "validate.plots=false", "--set", "validate.scorers=[magic]"]


def test_half_weight_linearity_on_known_responses() -> None:
    rng = np.random.default_rng(0)
    ref, full = rng.normal(size=4), rng.normal(size=(5, 4))
    lin = half_weight_linearity(ref, ref + full, ref + 0.5 * full)  # linear: half the weight, half the change
    assert lin.pearson == pytest.approx(1.0) and lin.slope == pytest.approx(1.0)
    assert lin.half_ratio == pytest.approx(0.5) and lin.linear and "respond linearly" in lin.verdict()
    assert (lin.pairs, lin.subsets) == (20, 5)
    half = rng.normal(size=(5, 4))
    lin = half_weight_linearity(ref, ref + full, ref + half)  # unrelated responses
    twice, drop = 2 * half.ravel(), full.ravel()
    assert lin.pearson == pytest.approx(np.corrcoef(twice, drop)[0, 1])
    assert lin.slope == pytest.approx(np.linalg.lstsq(twice[:, None], drop, rcond=None)[0][0])
    assert not lin.linear and "do NOT respond linearly" in lin.verdict()
    with pytest.raises(ShapeError):
        half_weight_linearity(ref, full, half[:, :3])


def _reference(run: Path, subsets: int, count: int) -> dict:
    """The check computed directly: the run's recipe retrained with explicit data weights."""
    from pipelines.config import parse_config
    from pipelines.families import collated, family_for

    cfg = parse_config(json.loads((run / "run.json").read_text())["config"])
    family = family_for(cfg)
    data = family.datasets(cfg)
    train, query = (collated(data[s], family.collate(cfg)) for s in ("train", "query"))
    n, t = len(train["y"]), cfg.train

    def margins(weights: torch.Tensor | None) -> np.ndarray:
        model = train_classifier(lambda: family.build_model(cfg), train["x"], train["y"], epochs=t.epochs, lr=t.lr,
                                 batch_size=t.batch_size, seed=t.seed, weights=weights)
        with torch.no_grad():
            return classification_margin(model(query["x"]), query["y"]).double().numpy()

    masks = sample_subsets(n, subsets, 0.95, seed=0)[:count]
    out = {w: np.stack([margins(torch.from_numpy(np.where(mk, 1.0, w)).float()) for mk in masks]) for w in (0.0, 0.5)}
    return half_weight_linearity(margins(None), out[0.0], out[0.5]).as_dict()


def test_validate_reports_the_linearity_check_and_resumes_after_a_kill(tmp_path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    assert main(["run", str(TINY), "--out", str(run), *RUN]) == 0
    calls = {0.0: 0, 0.5: 0, 1.0: 0}
    plain = ClassifierSubsetJob.run_weighted

    def counted(self, train, train_ids, query, query_ids, seed, weights):
        low = 1.0 if weights is None else float(weights.min())  # None: the full-set reference
        calls[low] = calls.get(low, 0) + 1
        if low == 0.5 and calls[0.5] == 3:
            raise KeyboardInterrupt  # killed during the third half-weight retraining
        return plain(self, train, train_ids, query, query_ids, seed, weights)

    monkeypatch.setattr(ClassifierSubsetJob, "run_weighted", counted)
    sets = [*CHECK, "--set", "validate.linearity_subsets=4"]
    with pytest.raises(KeyboardInterrupt):
        main(["validate", str(TINY), "--out", str(run), *RUN, *sets])
    assert calls == {0.0: 6, 1.0: 1, 0.5: 3}  # the ground truth (6 drops, the reference), two checks stored
    calls.update({0.0: 0, 0.5: 0, 1.0: 0})
    capsys.readouterr()
    assert main(["validate", str(TINY), "--out", str(run), *RUN, *sets]) == 0
    assert calls == {0.0: 0, 0.5: 2, 1.0: 0}  # resumed: only the two unfinished half-weight retrainings
    out = capsys.readouterr().out
    check = json.loads((run / "validation" / "validation.json").read_text())["linearity"]
    assert check["measured"] and check["weight"] == 0.5 and check["subsets"] == 4
    assert f"linearity (MAGIC): 4 subsets retrained with the dropped rows at weight 0.5: {check['verdict']}" in out
    want = _reference(run, 6, 4)
    for key in ("pearson", "slope", "half_ratio"):
        assert check[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert check["pairs"] == want["pairs"] == 4 * 20


def test_linearity_check_off_or_not_measurable(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", str(TINY), "--out", str(run), *RUN]) == 0
    assert main(["validate", str(TINY), "--out", str(run), *RUN, *CHECK, "--set", "validate.linearity_subsets=0"]) == 0
    res = json.loads((run / "validation" / "validation.json").read_text())
    assert res["linearity"] == {"measured": False, "reason": "validate.linearity_subsets is 0"}
    assert "linearity (MAGIC): not measured: validate.linearity_subsets is 0" in capsys.readouterr().out
    assert not (run / "linearity").exists()
    assert main(["validate", str(TINY), "--out", str(run), *RUN, "--set", "validate.subsets=4", "--set",
                 "validate.plots=false", "--set", "validate.ground_truth_dir=" + str(tmp_path / "gt-classic")]) == 0
    res = json.loads((run / "validation" / "validation.json").read_text())
    assert not res["linearity"]["measured"] and "small-drop" in res["linearity"]["reason"]
    assert main(["validate", str(TINY), "--out", str(run), *RUN, "--set", "validate.linearity_subsets=-1"]) == 2
    assert "validate.linearity_subsets must be an integer >= 0" in capsys.readouterr().err
