"""Fingerprint scheme 2: ``featurize`` enters fingerprints as the chosen projection's typed spec, so a
setting the projection ignores never invalidates stored work; a run folder made under scheme 1
(every ``featurize`` key, as tda wrote them before) keeps its scheme and is resumed and queried as it is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import pipelines.layout as layout
from pipelines.cli.main import main
from pipelines.config import load_config
from pipelines.families import family_for
from pipelines.run import claim_run_dir, feature_fingerprint, run_record
from pipelines.run_folder import recorded_config
from pipelines.spec.fingerprints import (FEATURE_SECTIONS, SCORE_SECTIONS, scorer_fingerprint, section_fingerprint,
                                         stable_dict)
from pipelines.spec.schema import QUERY_KEYS
from pipelines.methods.scorers import feature_kind
from stores._io import fingerprint
from tda.errors import FingerprintMismatchError
from tda.featurizers.choice import FALLBACK
from tda.featurizers.spec import AUTO_CHOICES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
MNIST = ROOT.parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")
RUN = ["--set", f"data.root={MNIST}", "--set", "train.models=1", "--quiet"]


def scheme1_feature_fingerprint(cfg, split: str = "train") -> str:
    """The feature fingerprint as tda computed it before scheme 2 (kept here as the reference):
    every ``featurize`` key of :func:`stable_dict`, plus the family's tag."""
    d = stable_dict(cfg)
    if split == "train":
        for key in QUERY_KEYS:
            d["data"].pop(key, None)
    family = family_for(cfg)
    return fingerprint({s: d[s] for s in FEATURE_SECTIONS}) + family.feature_tag(cfg, feature_kind(cfg, family))


def fingerprints(sets: list[str], version: int = layout.FINGERPRINT_VERSION) -> tuple[str, ...]:
    cfg = load_config(TINY, sets)
    return (feature_fingerprint(cfg, "train", version), feature_fingerprint(cfg, "query", version),
            section_fingerprint(cfg, *SCORE_SECTIONS, version=version), scorer_fingerprint(cfg, version))


@pytest.mark.parametrize("projection", ["dense", "sparse", "tensorsketch", "auto"])
def test_a_setting_the_projection_ignores_keeps_every_fingerprint(projection: str) -> None:
    base = [f"featurize.projection={projection}"]
    assert fingerprints(base) == fingerprints([*base, "featurize.k_in=8", "featurize.k_out=4"])
    assert fingerprints(base, 1) != fingerprints([*base, "featurize.k_in=8"], 1)  # scheme 1 counted it
    assert fingerprints(base) != fingerprints([*base, "featurize.k=32"])
    assert fingerprints(base) != fingerprints([*base, "featurize.seed=5"])
    ignores_projector = projection != "dense"  # the sign/entry kind is a dense (and factored) setting
    assert (fingerprints(base) == fingerprints([*base, "featurize.projector=gaussian"])) == ignores_projector


def test_a_setting_the_projection_uses_changes_the_fingerprints() -> None:
    factored = ["featurize.projection=factored"]
    assert fingerprints(factored) != fingerprints([*factored, "featurize.k_in=8"])
    assert fingerprints(factored) != fingerprints([*factored, "featurize.projector=gaussian"])
    assert fingerprints(factored) == fingerprints([*factored, "featurize.k=32"])  # its width is k_out x k_in
    sparse = ["featurize.projection=sparse"]
    assert fingerprints(sparse) != fingerprints([*sparse, "featurize.nonzeros=2"])
    assert fingerprints(["featurize.projection=dense"]) != fingerprints(sparse)
    # auto is hashed as auto (it resolves only with the model), with the settings of what it may become
    assert fingerprints(["featurize.projection=auto"]) != fingerprints(sparse)
    assert fingerprints(["featurize.projection=auto"]) != fingerprints(["featurize.nonzeros=2"])
    assert set(AUTO_CHOICES) == {"tensorsketch", FALLBACK}


def test_scheme_1_is_the_fingerprint_tda_computed_before() -> None:
    for sets in ([], ["featurize.projection=dense", "featurize.k_in=8"], ["featurize.projection=factored"]):
        cfg = load_config(TINY, sets)
        assert feature_fingerprint(cfg, "train", 1) == scheme1_feature_fingerprint(cfg)
        assert feature_fingerprint(cfg, "train") != feature_fingerprint(cfg, "train", 1)


def test_the_folder_scheme_comes_from_run_json(tmp_path: Path) -> None:
    paths = layout.RunPaths(tmp_path)
    assert layout.fingerprint_version(paths) == layout.fingerprint_version(None) == layout.FINGERPRINT_VERSION == 2
    paths.run_file.write_text(json.dumps({"format": "tda-run", "feature_fingerprint": "x"}))
    assert layout.fingerprint_version(paths) == 1  # written before schemes were recorded
    paths.run_file.write_text(json.dumps({"format": "tda-run", "fingerprint_version": 2}))
    assert layout.fingerprint_version(paths) == 2


def test_claiming_a_scheme_1_folder(tmp_path: Path) -> None:
    """A run.json as tda wrote it before scheme 2 is claimed unchanged; a setting the projection ignores
    that differs is refused there (it counts in that folder), saying why."""
    cfg = load_config(TINY, ["featurize.projection=dense"])
    record = run_record(cfg, 1)
    assert "fingerprint_version" not in record and record["feature_fingerprint"] == scheme1_feature_fingerprint(cfg)
    (tmp_path / "checkpoints").mkdir()  # some work, so the claim is not redone from scratch
    (tmp_path / "run.json").write_text(json.dumps(record))
    before = (tmp_path / "run.json").read_bytes()
    claim_run_dir(cfg, tmp_path, overwrite=False)
    assert (tmp_path / "run.json").read_bytes() == before
    with pytest.raises(FingerprintMismatchError, match=r"featurize.k_in: 16 -> 8; only settings the projection "
                                                       r"ignores differ, but .* fingerprint scheme 1"):
        claim_run_dir(load_config(TINY, ["featurize.projection=dense", "featurize.k_in=8"]), tmp_path, False)
    with pytest.raises(FingerprintMismatchError) as err:
        claim_run_dir(load_config(TINY, ["featurize.projection=dense", "featurize.k=32"]), tmp_path, False)
    assert "scheme 1" not in str(err.value) and "featurize.k: 64 -> 32" in str(err.value)
    claim_run_dir(load_config(TINY, ["featurize.projection=dense", "featurize.k_in=8"]), tmp_path, True)
    assert json.loads((tmp_path / "run.json").read_text())["fingerprint_version"] == 2  # made anew: scheme 2


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_mnist
def test_changing_a_setting_the_projection_ignores_reuses_the_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dense"
    dense = ["--set", "featurize.projection=dense"]
    assert main(["run", str(TINY), "--out", str(out), *RUN, *dense]) == 0
    assert json.loads((out / "run.json").read_text())["fingerprint_version"] == 2
    assert json.loads((out / "features-train" / "manifest.json").read_text())["spec"]["fingerprint_version"] == 2
    before = snapshot(out)
    assert main(["run", str(TINY), "--out", str(out), *RUN, *dense, "--set", "featurize.k_in=8",
                 "--set", "featurize.k_out=4"]) == 0
    after = snapshot(out)
    assert {name for name in before if before[name] != after.get(name)} == {"run.json"}  # it records the config
    assert recorded_config(layout.RunPaths(out)).featurize.k_in == 8
    assert main(["query", "--run", str(out), "--example", "3", "-k", "2"]) == 0
    assert main(["run", str(TINY), "--out", str(out), *RUN, *dense, "--set", "featurize.projector=gaussian"]) == 2
    assert "featurize.projector: 'rademacher' -> 'gaussian'" in capsys.readouterr().err
    assert snapshot(out) == after


@needs_mnist
def test_a_run_folder_of_scheme_1_is_resumed_and_queried(tmp_path: Path, monkeypatch, capsys) -> None:
    """A folder written under scheme 1 (as tda wrote them before: every fingerprint of scheme 1, no
    ``fingerprint_version``) is reused as it is: no stage recomputes, a lost shard is redone into the same
    store, and ``tda query`` answers from it (lean and full path)."""
    from pipelines.cli.query import full_answer
    from pipelines.query.lean import lean_answer

    out, sets = tmp_path / "old", ["--set", "featurize.projection=sparse"]
    with monkeypatch.context() as patch:
        patch.setattr(layout, "FINGERPRINT_VERSION", 1)  # a new folder gets scheme 1, as before scheme 2
        assert main(["run", str(TINY), "--out", str(out), *RUN, *sets]) == 0
    cfg = load_config(TINY, [f"data.root={MNIST}", "train.models=1", "featurize.projection=sparse"])
    run = json.loads((out / "run.json").read_text())
    assert "fingerprint_version" not in run and run["feature_fingerprint"] == scheme1_feature_fingerprint(cfg)
    manifest = json.loads((out / "features-train" / "manifest.json").read_text())
    assert manifest["fingerprint"] == scheme1_feature_fingerprint(cfg) + "-train"
    assert "fingerprint_version" not in manifest["spec"]
    before = snapshot(out)
    assert main(["run", str(TINY), "--out", str(out), *RUN, *sets]) == 0
    assert snapshot(out) == before  # found and reused, not recomputed, nothing rewritten
    assert main(["query", "--run", str(out), "--example", "3", "-k", "2"]) == 0
    paths = layout.RunPaths(out)
    lean, full = lean_answer(paths, [3], "query", 2), full_answer(paths, [3], "query", 2)
    assert lean.top["proponent_ids"].tolist() == full.top["proponent_ids"].tolist()
    m = json.loads((out / "features-train" / "manifest.json").read_text())  # lose shard 1 and the scores
    m["complete"] = {k: v for k, v in m["complete"].items() if not k.endswith("/1")}
    (out / "features-train" / "manifest.json").write_text(json.dumps(m))
    (out / "scores" / "scores.json").unlink()
    assert main(["run", str(TINY), "--out", str(out), *RUN, *sets]) == 0
    after, resumed = snapshot(out), json.loads((out / "features-train" / "manifest.json").read_text())
    assert resumed["fingerprint"] == manifest["fingerprint"] and resumed["complete"] == manifest["complete"]
    assert json.loads((out / "scores" / "scores.json").read_text())["fingerprint"] == section_fingerprint(
        cfg, *SCORE_SECTIONS, version=1)
    rewritten = {"features-train/manifest.json", "scores/scores.json"}  # the same shard again, the same scores
    assert {name: after[name] for name in after if name not in rewritten} == \
        {name: before[name] for name in before if name not in rewritten}
    capsys.readouterr()
    assert main(["run", str(TINY), "--out", str(out), *RUN, *sets, "--set", "featurize.k_in=8"]) == 2
    assert "fingerprint scheme 1" in capsys.readouterr().err
