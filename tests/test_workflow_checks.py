"""What tda curate and tda unlearn read is checked before use (issue: reliability beyond tda run):
scores made by another scorer setting are recomputed, a calibration fitted for other scores is
not applied, and a damaged retraining result is retrained, never reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.cli.main import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_unlearn_after_a_rescore_with_another_scorer_uses_its_own_scores(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    base = [str(TINY), "--out", str(run), "--set", "unlearn.retrain_seeds=0", "--set", "unlearn.approximate=false",
            "--quiet"]
    assert main(["run", str(TINY), "--out", str(run), "--quiet"]) == 0
    assert main(["unlearn", *base]) == 0
    first = json.loads((run / "unlearning" / "unlearning.json").read_text())
    assert main(["run", str(TINY), "--out", str(run), "--set", "score.scorer=graddot", "--quiet"]) == 0  # a rescore
    capsys.readouterr()
    assert main(["unlearn", *base]) == 0  # the config says trak: trak's scores are made again, then used
    assert "scores are of other settings" in capsys.readouterr().err
    again = json.loads((run / "unlearning" / "unlearning.json").read_text())
    assert again["scorer"] == "trak" and again["forget_ids"] == first["forget_ids"]
    np.testing.assert_allclose(again["predicted"]["per_query"], first["predicted"]["per_query"], rtol=1e-5)


def test_a_calibration_is_applied_only_to_its_own_scores_and_only_when_it_predicts(tmp_path) -> None:
    from pipelines.config import load_config
    from pipelines.layout import RunPaths
    from pipelines.workflows.unlearn import calibration_for

    run = tmp_path / "run"
    sets = ["--set", "validate.subsets=4", "--set", "unlearn.retrain_seeds=0", "--set", "unlearn.approximate=false"]
    assert main(["validate", str(TINY), "--out", str(run), *sets, "--quiet"]) == 0
    record_path = run / "validation" / "validation.json"
    record = json.loads(record_path.read_text())
    fit = record["scorers"]["trak"]["calibration"]["fit"]
    for slope, low, applied in ((0.8, 0.2, True), (0.8, -0.1, False), (-1.2, -5.0, False)):
        fit.update(slope=slope, slope_ci=[low, slope + 1])
        record_path.write_text(json.dumps(record))
        cfg = load_config(TINY)
        assert (calibration_for(cfg, RunPaths(run)) is not None) == applied, (slope, low)
        other = load_config(TINY, ["score.lambda_rel=100"])  # fitted for other scores: never applied
        assert calibration_for(other, RunPaths(run)) is None


def test_a_damaged_curation_retraining_is_retrained(tmp_path) -> None:
    run = tmp_path / "run"
    args = ["curate", str(TINY), "--out", str(run), "--set", "curate.retrain_seeds=1", "--quiet"]
    assert main(args) == 0
    first = json.loads((run / "curation" / "curation.json").read_text())["check"]
    saved = sorted((run / "curation" / "retrain").glob("*.npy"))
    np.save(saved[0], np.full_like(np.load(saved[0]), 2.2))  # a plausible-looking but wrong result
    assert main(args) == 0
    again = json.loads((run / "curation" / "curation.json").read_text())["check"]
    assert again == first and not np.all(np.load(saved[0]) == 2.2)


def test_a_server_stops_answering_new_inputs_once_a_checkpoint_changes(tmp_path) -> None:
    """The server pins the checkpoints at start: a rewritten one gives 503 with the reason, never an
    answer that mixes models; a freshly started server refuses the run naming the full rerun."""
    import torch

    from pipelines.layout import RunPaths, load_checkpoint_list
    from pipelines.run import datasets_for
    from pipelines.run_folder import recorded_config
    from pipelines.query.serve import _status
    from pipelines.query.state import Service
    from tda.errors import InputChangedError

    run = tmp_path / "run"
    assert main(["run", str(TINY), "--out", str(run), "--quiet"]) == 0
    paths = RunPaths(run)
    service = Service.load(paths)
    row = datasets_for(recorded_config(paths), paths)["query"][2]
    rows = [{"image": list(row["image"]), "label": row["label"]}]
    service.new_inputs(rows, 3)  # answers while the inputs are as they were
    ckpt = paths.checkpoint_file(load_checkpoint_list(paths)[1])
    state = torch.load(ckpt, weights_only=True)
    torch.save({k: v * 2 for k, v in state.items()}, ckpt)
    try:
        service.new_inputs(rows, 3)
        raise AssertionError("a changed checkpoint was used")
    except InputChangedError as exc:
        assert _status(exc) == 503 and "changed after this server started" in str(exc)
    try:
        Service.load(paths)
        raise AssertionError("a run with a changed checkpoint was served")
    except InputChangedError as exc:
        assert "--overwrite" in str(exc) and "--from index" not in str(exc)


def test_a_rerun_of_a_finished_unlearn_reproduces_it_byte_for_byte(tmp_path) -> None:
    run = tmp_path / "run"
    args = ["unlearn", str(TINY), "--out", str(run), "--set", "unlearn.retrain_seeds=1", "--quiet"]
    assert main(args) == 0
    first = (run / "unlearning" / "unlearning.json").read_bytes()
    assert main(args) == 0
    assert (run / "unlearning" / "unlearning.json").read_bytes() == first
    assert main([*args, "--set", "unlearn.approx_steps=3"]) == 0  # another setting: computed again
    assert json.loads((run / "unlearning" / "unlearning.json").read_text())["approximate"]["steps"] == 3


def test_a_workflow_records_the_labels_a_killed_run_did_not(tmp_path) -> None:
    """Found by benchmarks/kills.py (curate on an empty folder, killed three times): a run killed
    after its scores but before its labels were recorded is finished for curate; curate records
    them (as the uninterrupted `tda run` does), not leaving the folder short of them."""
    from pathlib import Path

    from pipelines.cli.main import main

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    run = tmp_path / "run"
    sets = ["--set", "curate.retrain_seeds=0"]
    assert main(["run", str(tiny), "--out", str(run), "--quiet", *sets]) == 0
    want = {p.name: p.read_bytes() for p in (run / "labels").iterdir()}
    for p in (run / "labels").iterdir():
        p.unlink()
    assert main(["curate", str(tiny), "--out", str(run), "--quiet", *sets]) == 0
    got = {p.name: p.read_bytes() for p in (run / "labels").iterdir()}
    assert got.keys() == want.keys() and got["labels.npz"] == want["labels.npz"]
