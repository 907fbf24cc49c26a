"""A run: claiming its folder, the fingerprint of its features, and what its family provides.

What depends on the kind of model (data, model, task, collate, featurizer) comes from the run's
model family (:mod:`pipelines.families`) and the kind of features from its scorer
(:mod:`pipelines.methods.scorers`); the functions here dispatch to them. Paths of the run folder are
in :mod:`pipelines.layout` (re-exported here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stores._io import save_json
from stores.digests import DIGESTS
from tda.data.loading import arrow_columns, example_ids, mnist_collate
from tda.errors import FingerprintMismatchError, ForeignStoreError, StoreCorruptError, TDAError

from pipelines.families import family_for, resolve_device  # noqa: F401
from pipelines.layout import (FINGERPRINT_VERSION, INPUTS_FILE, RUN_FILE, RunPaths, fingerprint_version,  # noqa: F401
                              load_checkpoint_list)
from pipelines.spec.method import method_for
from pipelines.spec.schema import QUERY_KEYS, RunConfig, _build, input_digests
from pipelines.spec.fingerprints import FEATURE_SECTIONS, section_fingerprint
from pipelines.methods.scorers import feature_kind


def claim_run_dir(cfg: RunConfig, root: Path, overwrite: bool) -> None:
    """Refuse a folder holding another configuration's outputs unless ``overwrite``.

    The run belongs to the training side of the configuration (data, model, train, featurize,
    without the choice of queries): a run with other queries reuses its checkpoints and train
    features. Inputs count by content (:mod:`stores.digests`): moved data is accepted, data
    changed in place is refused naming the key. A folder keeps the fingerprint scheme it was made
    under (:func:`pipelines.layout.fingerprint_version`). ``run.json`` is rewritten only when it changed.
    """
    paths = RunPaths(root)
    DIGESTS.load(paths.root / INPUTS_FILE)
    old = None
    if paths.run_file.is_file() and not any(p.name not in CLAIM_FILES for p in root.iterdir()):
        paths.run_file.unlink()  # a claim without work (a run that failed before any stage): claim anew
    version = fingerprint_version(paths)
    if paths.run_file.is_file():
        try:
            old = json.loads(paths.run_file.read_text())
        except (OSError, ValueError) as exc:
            if not overwrite:
                raise StoreCorruptError(f"{paths.run_file} is not valid JSON ({exc}); restore it, or pass "
                                        "--overwrite to replace the run folder") from exc
        if not isinstance(old, dict) or old.get("feature_fingerprint") != feature_fingerprint(cfg, "train", version):
            if not overwrite:
                what = describe_change(old, run_record(cfg, version)) + legacy_note(old, cfg, version)
                raise FingerprintMismatchError(
                    f"{root} holds outputs of a different configuration ({what}); pass --overwrite to recompute them, "
                    "put the old value or files back, or choose another out_dir")
            for child in root.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            old, version = None, fingerprint_version(paths)  # a new folder: the current scheme
    elif root.exists() and any(p.name not in CLAIM_FILES for p in root.iterdir()):
        if not overwrite:
            raise ForeignStoreError(f"{root} is not empty and is not a tda run folder; choose an empty out_dir, or "
                                    "pass --overwrite to replace its contents (also after an interrupted --overwrite)")
    root.mkdir(parents=True, exist_ok=True)
    record = run_record(cfg, version)
    if old != json.loads(json.dumps(record)):
        save_json(paths.run_file, record)
    DIGESTS.save(paths.root / INPUTS_FILE)


def run_record(cfg: RunConfig, version: int) -> dict[str, Any]:
    """``run.json`` of a run of ``cfg`` under fingerprint scheme ``version`` (scheme 1 as it was
    written before schemes were recorded: without ``fingerprint_version``)."""
    scheme = {"fingerprint_version": version} if version >= 2 else {}
    return {"format": "tda-run", "feature_fingerprint": feature_fingerprint(cfg, "train", version), **scheme,
            "config": cfg.to_dict(), "inputs": input_record(cfg)}


def legacy_note(old: Any, cfg: RunConfig, version: int) -> str:
    """For a folder of fingerprint scheme 1 whose run differs from ``cfg`` only in settings the
    projection ignores (the current scheme would reuse it): why it is refused all the same."""
    if version >= 2 or not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return ""
    try:
        recorded = _build(RunConfig, old["config"], "")
        same = feature_fingerprint(recorded, "train") == feature_fingerprint(cfg, "train")
    except (TDAError, KeyError, TypeError, ValueError):
        return ""
    return ("; only settings the projection ignores differ, but an older tda made this folder, under fingerprint "
            "scheme 1, where they still count" if same else "")


#: What claiming a run folder writes before any stage runs (the record, the input-digest cache, the lock).
CLAIM_FILES = (RUN_FILE, INPUTS_FILE, ".lock")


def input_record(cfg: RunConfig) -> dict[str, Any]:
    """``{"section.key": {"path": ..., "sha256": ...}}`` of the run's inputs, for run.json (the path is a hint)."""
    record = {}
    for name, digest in input_digests(cfg).items():
        section, key = name.split(".")
        record[name] = {"path": getattr(getattr(cfg, section), key), "sha256": digest}
    return record


def describe_change(old: Any, new: dict[str, Any]) -> str:
    """What differs between the run.json ``old`` and ``new``: config keys of the training side, and
    inputs whose content changed (at the same path or another)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return "run.json records no configuration"
    changes = []
    old_inputs, new_inputs = old.get("inputs") or {}, new["inputs"]
    queries = {f"data.{k}" for k in QUERY_KEYS}  # not part of the training side
    for name in sorted((set(old_inputs) | set(new_inputs)) - queries):
        a, b = old_inputs.get(name) or {}, new_inputs.get(name) or {}
        if a.get("sha256") != b.get("sha256"):
            where = f"at {b.get('path')}" if a.get("path") == b.get("path") else f"{a.get('path')} -> {b.get('path')}"
            changes.append(f"the content of {name} changed ({where})")
    skip = set(old_inputs) | set(new_inputs) | queries  # inputs count by content, above
    for section in FEATURE_SECTIONS:
        a, b = old["config"].get(section) or {}, new["config"].get(section) or {}
        for key in sorted(set(a) | set(b)):
            if f"{section}.{key}" not in skip and a.get(key) != b.get(key):
                changes.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    if not changes:  # the family featurizes differently for another scorer (AirRep's representations)
        a, b = old["config"].get("score") or {}, new["config"].get("score") or {}
        changes = [f"score.{k}: {a.get(k)!r} -> {b.get(k)!r} needs other features" for k in ("scorer", "options")
                   if a.get(k) != b.get(k)]
    return "; ".join(changes) or "data/model/train/featurize differ: the run was made by another tda version"


def feature_fingerprint(cfg: RunConfig, split: str = "query", version: int = FINGERPRINT_VERSION) -> str:
    """Hash of everything the stored features of ``split`` depend on (config sections plus the
    family's tag); ``split="train"`` leaves out the choice of queries (:data:`QUERY_KEYS`);
    ``version``: the fingerprint scheme (:func:`pipelines.spec.fingerprints.section_fingerprint`)."""
    family = family_for(cfg)
    method = method_for(cfg.score.scorer)  # a preconditioned query featurizer (EK-FAC) tags its features
    preconditioned = f"-{method.name}" if split != "train" and method.preconditioned_queries else ""
    return (section_fingerprint(cfg, *FEATURE_SECTIONS, queries=split != "train", version=version)
            + family.feature_tag(cfg, feature_kind(cfg, family)) + preconditioned)


def datasets_for(cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
    """The train and query data sets of a run (``paths``: the run folder, for run-made queries)."""
    return family_for(cfg).datasets(cfg, paths)


def build_model(cfg: RunConfig) -> torch.nn.Module:
    return family_for(cfg).build_model(cfg)


def make_featurizer(cfg: RunConfig, split: str = "train", paths: RunPaths | None = None):
    """The featurizer of ``split`` for the run's feature kind (most families use one for both splits)."""
    family = family_for(cfg)
    method = method_for(cfg.score.scorer)
    if split == "query" and method.preconditioned_queries:
        return method.query_featurizer(cfg, paths, feature_fingerprint(cfg, "train", fingerprint_version(paths)))
    return family.featurizer(cfg, split, feature_kind(cfg, family), paths)


def collate_for(cfg: RunConfig):
    return family_for(cfg).collate(cfg)


def as_numpy_batch(dataset, cfg: RunConfig | None = None) -> dict[str, torch.Tensor]:
    """Whole dataset collated at once (for training the small demo models); MNIST without ``cfg``."""
    collate = mnist_collate if cfg is None else collate_for(cfg)
    return collate(arrow_columns(dataset.with_format("arrow")[:]))


def ids_to_rows(dataset) -> dict[int, int]:
    return {int(i): r for r, i in enumerate(np.asarray(example_ids(dataset)))}
