"""`tda run`'s summary says which projection and which TRAK ridge it used, and why: the figures
printed are those its manifests record."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.cli.main import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_summary_names_the_ridge_and_the_rule(tmp_path, capsys) -> None:
    assert main(["run", str(TINY), "--out", str(tmp_path / "auto"), "--quiet"]) == 0
    out = capsys.readouterr().out
    hyper = json.loads((tmp_path / "auto" / "scorer" / "scorer.json").read_text())["hyperparameters"]
    chosen = ", ".join(f"{x:.3g}" for x in hyper["chosen_lambda_rel"])
    dfs = ", ".join(f"{x:.1f}" for x in hyper["target_df"])
    assert f"TRAK ridge lambda_rel {chosen} per checkpoint (auto: effective dimension df = " in out
    assert f"here df {dfs})" in out
    assert "projection tensorsketch (auto: " in out
    assert main(["run", str(TINY), "--out", str(tmp_path / "fixed"), "--quiet", "--set", "score.lambda_rel=0.1"]) == 0
    assert "TRAK ridge lambda_rel 0.1, 0.1 (score.lambda_rel)" in capsys.readouterr().out
    assert main(["run", str(TINY), "--out", str(tmp_path / "tracin"), "--quiet", "--set", "score.scorer=tracin"]) == 0
    assert "TRAK ridge" not in capsys.readouterr().out
