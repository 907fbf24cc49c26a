"""Checks that a folder holds a finished ``tda run`` of a configuration (shared by the commands that read one).

This module imports neither torch nor a model family at its top (the numpy-only ``tda query``
reads a run through it); what needs them is imported inside the functions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stores import FeatureStore, index_files, scorer_state, scores_files
from stores.digests import DIGESTS
from tda.errors import (ConfigError, FingerprintMismatchError, ForeignStoreError, QueryError, StoreCorruptError,
                        StoreError, TDAError)
from tda.core.features import FeatureBlock, concat_blocks

from pipelines.config import _build, parse_config
from pipelines.layout import INPUTS_FILE, RunPaths, fingerprint_version
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)

#: how many existing ids an error about a missing one lists
IDS_SHOWN = 10


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
    error naming what differs (the first differing keys) or is missing and ``finish``, the command
    that completes the run."""
    from pipelines.run import feature_fingerprint

    if read_run_file(paths, finish).get("feature_fingerprint") != feature_fingerprint(cfg, "train",
                                                                                      fingerprint_version(paths)):
        raise FingerprintMismatchError(
            f"{paths.root} holds a run of another configuration ({differing_keys(cfg, paths)}); use the config and "
            f"--set options it was run with, or pass --out a new folder (this command then runs {finish.replace(str(paths.root), 'NEW')} "
            "there first)")
    check_complete(paths, {"scores": (scores_files.MARKER_FILE, "not scored")}, finish)


def differing_keys(cfg: RunConfig, paths: RunPaths, shown: int = 5) -> str:
    """``data.train_size 2000 here, 1000 in the run; ...``: the feature-side keys where ``cfg`` and
    the folder's recorded run differ (as hashed: inputs by content digest)."""
    from pipelines.spec.schema import QUERY_KEYS
    from pipelines.spec.fingerprints import FEATURE_SECTIONS, stable_dict

    try:
        theirs = stable_dict(recorded_config(paths, check=False))
    except TDAError:
        return "its run.json cannot be read as a config"
    mine, diffs = stable_dict(cfg), []
    for section in FEATURE_SECTIONS:
        for key in sorted(set(mine.get(section, {})) | set(theirs.get(section, {}))):
            if section == "data" and key in QUERY_KEYS:
                continue
            a, b = mine.get(section, {}).get(key), theirs.get(section, {}).get(key)
            if a != b:
                diffs.append(f"{section}.{key} {a!r} here, {b!r} in the run")
    if not diffs:
        return "data/model/train/featurize differ"
    return "; ".join(diffs[:shown]) + (f"; and {len(diffs) - shown} more" if len(diffs) > shown else "")


#: What ``tda query`` reads besides the feature stores: folder -> (completion marker, what is missing).
QUERY_NEEDS = {"scorer": (scorer_state.MARKER_FILE, "no fitted scorer"), "index": (index_files.META_FILE, "no index")}


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
    from tda.data.loading import example_ids

    if column not in dataset.column_names:
        return {}
    cols = dataset.with_format("numpy")
    return dict(zip(np.asarray(example_ids(dataset)).tolist(), np.asarray(cols[column]).tolist()))


def label_column(cfg: RunConfig) -> str:
    """The column holding the class labels: ``data.label_column`` for the user's and Hugging Face
    models, ``label`` in the demo data sets."""
    return cfg.data.label_column if cfg.model.family in ("user", "hf") else "label"


def class_names(cfg: RunConfig, data: Mapping[str, Any]) -> list[str] | None:
    """Names of the classes 0..C-1, from (first found) ``data.class_names``, the ``datasets.ClassLabel``
    names of the training set's label column, or a Hugging Face model's ``config.id2label`` (not its
    default ``LABEL_0, LABEL_1, ...``); None without any. Names that only repeat the class ids
    (``"0", "1", ...``) are none."""
    if cfg.data.class_names:
        names = [str(n) for n in cfg.data.class_names]
        _check_names_cover(names, data.get("train"), label_column(cfg))
        return names
    features = getattr(data.get("train"), "features", None) or {}
    names = getattr(features.get(label_column(cfg)), "names", None)
    if names and [str(n) for n in names] != [str(i) for i in range(len(names))]:
        return [str(n) for n in names]
    return _id2label(cfg)


def _check_names_cover(names: list[str], train: Any, column: str) -> None:
    """``data.class_names`` must name every class the training labels use."""
    if train is None or column not in getattr(train, "column_names", []):
        return
    labels = np.asarray(train.with_format("numpy")[column])
    if labels.size and labels.dtype.kind in "iu" and int(labels.max()) >= len(names):
        raise ConfigError(f"data.class_names has {len(names)} names, but the training labels ({column!r}) go up to "
                          f"{int(labels.max())}: give one name per class 0..{int(labels.max())}")


def _id2label(cfg: RunConfig) -> list[str] | None:
    """``id2label`` of the ``model.hf`` folder's ``config.json`` (read as JSON; no transformers)."""
    if cfg.model.family != "hf" or not cfg.model.hf:
        return None
    try:
        labels = json.loads((Path(cfg.model.hf) / "config.json").read_text()).get("id2label") or {}
        pairs = sorted((int(k), str(v)) for k, v in labels.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    names = [v for _, v in pairs]
    if [k for k, _ in pairs] != list(range(len(pairs))) or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names or None


def texts_of(cfg: RunConfig, paths: RunPaths | None, data: Mapping[str, Any], split: str) -> dict[int, str]:
    """``id -> text`` of a split: the family's decoded texts (a language model's token ids), else the
    string column ``data.text_column`` (or ``text``); empty when the data hold no text."""
    from tda.data.loading import example_ids

    from pipelines.families import family_for

    decode = getattr(family_for(cfg), "example_texts", None)
    if decode is not None:
        return {int(i): str(t) for i, t in decode(cfg, paths, split).items()}
    dataset = data[split]
    for column in dict.fromkeys((cfg.data.text_column, "text")):
        if column in dataset.column_names and getattr(dataset.features[column], "dtype", None) in ("string",
                                                                                                   "large_string"):
            values = dataset.with_format("arrow")[column].to_pylist()
            return {int(i): "" if t is None else str(t) for i, t in zip(example_ids(dataset), values)}
    return {}


@dataclass
class RunLabels:
    """What ``tda query`` prints beside ids and scores: ``labels`` (split -> id -> label), the class
    ``names`` (None: the run has none) and ``texts`` (split -> id -> text; empty: no texts)."""

    labels: dict[str, dict[int, Any]]
    names: list[str] | None = None
    texts: dict[str, Mapping[int, str]] = field(default_factory=dict)


def dataset_labels(cfg: RunConfig, paths: RunPaths | None) -> RunLabels:
    """Labels, class names and texts of both splits read from the data sets (imports the family)."""
    from pipelines.run import datasets_for

    data = datasets_for(cfg, paths)
    labels = {split: labels_of(data[split], label_column(cfg)) for split in ("train", "query")}
    names = class_names(cfg, data)
    seen = [v for split in labels.values() for v in split.values() if isinstance(v, int)]
    if names and seen and max(seen) >= len(names):
        logger.warning("%d class names given for labels up to %d; labels without a name are shown as numbers",
                       len(names), max(seen))
    return RunLabels(labels, names, {split: texts_of(cfg, paths, data, split) for split in ("train", "query")})


def missing_ids_error(missing: list[int], ids: np.ndarray, split: str, root: Any) -> QueryError:
    """The error for ``missing`` ids of ``split``: how many ids exist, the first of them, and the
    command that lists them all (ids need not be contiguous: a random subset keeps file positions)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    first = ", ".join(str(int(i)) for i in ids[:IDS_SHOWN]) + (", ..." if len(ids) > IDS_SHOWN else "")
    contiguous = len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1
    span = f", ids {int(ids[0])}..{int(ids[-1])}" if contiguous else ""
    flag = "" if split == "query" else f" --split {split}"
    return QueryError(f"example id(s) {list(missing)[:5]} are not in the {split} split of this run; {split} ids that "
                      f"exist: {first} ({len(ids)} in all{span}; `tda query --run {root}{flag} --list` lists them); "
                      f"pick an id from that {'range' if contiguous else 'list'}, or raise data.{split}_size and "
                      "rerun to store more")


def stored_features(paths: RunPaths, examples: list[int], split: str) -> FeatureBlock:
    """Stored features of ``examples`` (in that order) from the split's store."""
    store = FeatureStore.open(paths.store(split))
    ids = store.ids()
    rows = {int(i): r for r, i in enumerate(ids)}
    missing = [e for e in examples if e not in rows]
    if missing:
        raise missing_ids_error(missing, ids, split, paths.root)
    size = store.manifest["shard_size"]
    shards = {s: store.read_shard(s) for s in sorted({rows[e] // size for e in examples})}  # each read once
    return concat_blocks([shards[rows[e] // size].select(slice(rows[e] % size, rows[e] % size + 1))
                          for e in examples])
