"""A seeded kill campaign (issue 11): tiny runs SIGKILLed at random instants, some during a
configuration-changing rerun, a query change or an ``--overwrite``, each finished by a plain
rerun of either configuration, must equal an uninterrupted run byte for byte. The larger
campaign is ``python benchmarks/kills.py`` (figures in docs/reliability.md)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kills import RUN_SCENARIOS, campaign  # noqa: E402


def test_kill_campaign_resumes_every_scenario_to_the_uninterrupted_result(tmp_path) -> None:
    # the tda-run scenarios; the benchmark adds AirRep's retrain stage and tda validate (slower)
    result = campaign(12, ["local"], seed=11, work=tmp_path, in_process=True, scenarios=RUN_SCENARIOS)
    assert result["failures"] == [], result["failures"]
    assert result["kills"] >= 12
    assert set(result["by_scenario"]) == {f"local/{s}" for s in RUN_SCENARIOS}  # every scenario killed
    worked = {k.split("/")[1] for k, n in result["by_stage"].items() if n}
    assert len(worked - {"startup"}) >= 2, result["by_stage"]  # kills landed inside stages, not only at start
