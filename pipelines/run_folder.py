"""Checks that a folder holds a finished ``tda run`` of a configuration (shared by the commands that read one).

This module imports neither torch nor a model family at its top (the numpy-only ``tda query``
reads a run through it); what needs them is imported inside the functions.
"""

from __future__ import annotations

import json

import numpy as np

from stores import FeatureStore
from stores.digests import DIGESTS
from tda.errors import (ConfigError, FingerprintMismatchError, ForeignStoreError, QueryError, StoreCorruptError,
                        StoreError)
from tda.features import FeatureBlock, concat_blocks

from .config import _build, parse_config
from .layout import INPUTS_FILE, RunPaths
from .schema import RunConfig


def read_run_file(paths: RunPaths, make: str = "") -> dict:
    """``run.json`` of a run folder; :class:`ForeignStoreError` / :class:`StoreCorruptError` if absent or
    damaged (``make``: the command that makes the run, named in the message)."""
    if not paths.run_file.is_file():
        what = "does not exist (check the path)" if not paths.root.exists() else "is not a tda run folder (no run.json)"
        raise ForeignStoreError(f"{paths.root} {what}; run {make or f'`tda run CONFIG --out {paths.root}`'} first")
    try:
        run = json.loads(paths.run_file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(
            f"{paths.run_file} is not valid JSON ({exc}); restore it, or rerun into a new folder (or pass --overwrite)"
        ) from exc
    if not isinstance(run, dict) or run.get("format") != "tda-run" or not isinstance(run.get("config"), dict):
        raise ForeignStoreError(f"{paths.run_file} was not written by `tda run`; choose another folder")
    return run


def check_finished(cfg: RunConfig, paths: RunPaths, finish: str) -> None:
    """``tda validate``: the folder must hold a finished run of this configuration; otherwise an
    error naming what differs or is missing and ``finish``, the command that completes the run."""
    from .run import feature_fingerprint

    if read_run_file(paths, finish).get("feature_fingerprint") != feature_fingerprint(cfg, "train"):
        raise FingerprintMismatchError(
            f"{paths.root} holds a run of another configuration (data/model/train/featurize differ); validate it "
            f"with the config and --set options it was run with, or run {finish} into another --out first")
    check_complete(paths, {"scores": ("scores.json", "not scored")}, finish)


#: What ``tda query`` reads besides the feature stores: folder -> (completion marker, what is missing).
QUERY_NEEDS = {"scorer": ("scorer.json", "no fitted scorer"), "index": ("index.json", "no index")}


def check_complete(paths: RunPaths, needs: dict[str, tuple[str, str]], finish: str) -> None:
    """Both feature stores complete and every ``needs`` marker written, else a :class:`StoreError`
    listing what is missing and naming ``finish``."""
    missing = []
    for split in ("train", "query"):
        if not (paths.store(split) / "manifest.json").is_file():
            missing.append(f"{paths.store(split).name}/ (no features)")
        elif pending := FeatureStore.open(paths.store(split)).pending():
            missing.append(f"{paths.store(split).name}/ ({len(pending)} unfinished shard job(s))")
    missing += [f"{name}/ ({what})" for name, (marker, what) in needs.items() if not (paths.root / name / marker).is_file()]
    if missing:
        raise StoreError(f"{paths.root} holds an unfinished run: {'; '.join(missing)}; complete it with {finish} "
                         "(finished work is reused)")


def recorded_config(paths: RunPaths, check: bool = True) -> RunConfig:
    """The configuration ``run.json`` records (its input digests loaded, read only); ``check=False``:
    without the family's checks (and without importing the family)."""
    recorded = read_run_file(paths)["config"]
    DIGESTS.load(paths.root / INPUTS_FILE)  # input digests the run recorded (read only: a query writes nothing)
    try:
        _build(RunConfig, recorded, "")  # the record itself; the family's checks follow in parse_config
    except ConfigError as exc:
        raise StoreCorruptError(f"{paths.run_file} records a config this version cannot use ({exc}); restore the "
                                f"file, or rerun `tda run CONFIG --out {paths.root} --overwrite`") from exc
    return parse_config(recorded, check=check)


def labels_of(dataset, column: str = "label") -> dict[int, int]:
    """``id -> label`` of a data set with a label column; empty without one (text, for example)."""
    from tda.data import example_ids

    if column not in dataset.column_names:
        return {}
    cols = dataset.with_format("numpy")
    return dict(zip(np.asarray(example_ids(dataset)).tolist(), np.asarray(cols[column]).tolist()))


def stored_features(paths: RunPaths, examples: list[int], split: str) -> FeatureBlock:
    """Stored features of ``examples`` (in that order) from the split's store."""
    store = FeatureStore.open(paths.store(split))
    ids = store.ids()
    rows = {int(i): r for r, i in enumerate(ids)}
    missing = [e for e in examples if e not in rows]
    if missing:
        raise QueryError(
            f"example id(s) {missing[:5]} are not in the {split} split of this run (ids {int(ids.min())}.."
            f"{int(ids.max())}); pick an id from that range or raise data.{split}_size and rerun"
        )
    size = store.manifest["shard_size"]
    shards = {s: store.read_shard(s) for s in sorted({rows[e] // size for e in examples})}  # each read once
    return concat_blocks([shards[rows[e] // size].select(slice(rows[e] % size, rows[e] % size + 1))
                          for e in examples])
