"""Reading a run configuration: YAML at the edge, paths resolved, then checked by its family.

:func:`load_config` reads a YAML file; every path in it (data files and folders, checkpoints,
the Hugging Face folder, ``file.py:fn`` import strings) resolves against **the config file's
folder**, so a config runs the same from any working directory and on dask workers started
elsewhere; ``--set`` overrides resolve against the working directory, as command-line paths do.
The resolved config holds absolute paths; the folder is also recorded as ``code_dir`` so that
``module:fn`` strings import from beside the config (in ``tda run``, ``tda query`` and on
workers alike). After the sections are built, the model family checks what only it knows
(:func:`pipelines.families.check_config`): architecture, data set, scorer, ``model.options``.

The sections themselves (dataclasses and fingerprints) live in :mod:`pipelines.spec.schema`, which
imports no family; their names are re-exported here.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any


from tda.errors import ConfigError, reading

from pipelines.spec.yaml_strict import load_yaml
from pipelines.spec.schema import (IMPORT_KEYS, INPUT_KEYS, LATER_KEYS, QUERY_KEYS, DataConfig,  # noqa: F401
                                   ExecutorConfig, FeaturizeConfig, IndexConfig, ModelConfig, RunConfig, ScoreConfig,
                                   TrainConfig, ValidateConfig, _build)
from pipelines.spec.fingerprints import (FEATURE_SECTIONS, OUTPUT_KEYS, SCORE_SECTIONS,  # noqa: F401
                                         scorer_fingerprint, section_fingerprint, stable_dict)

#: ``(section, key)`` of every path-valued key: the inputs, and where ground truth is kept.
#: Import strings (:data:`IMPORT_KEYS`): ``path/file.py:fn`` resolves its file, ``module:fn`` imports from ``code_dir``.
PATH_KEYS = INPUT_KEYS + (("validate", "ground_truth_dir"),)


def parse_config(values: dict[str, Any], overrides: list[str] | None = None, base: str | Path | None = None,
                 check: bool = True) -> RunConfig:
    """Build and check a :class:`RunConfig` from a mapping plus ``section.key=value`` overrides.

    Args:
        values: the config as a mapping (the YAML document).
        overrides: ``section.key=value`` strings, values parsed as YAML; their paths resolve
            against the working directory.
        base: folder the paths of ``values`` resolve against (default: the working directory).
        check: run the family's checks (:func:`check_config`); ``False`` builds the sections only,
            without importing any family (the numpy-only ``tda query`` on a recorded config).
    """
    if not isinstance(values or {}, dict):
        raise ConfigError(f"a config must be a mapping of sections (data:, model:, ...), got a {type(values).__name__}")
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (values or {}).items()}
    base = Path(base) if base is not None else Path.cwd()
    _resolve_paths(values, base)
    values.setdefault("code_dir", str(base.resolve()))
    for item in overrides or []:
        section, key, value = _override(values, item)
        if (section, key) in PATH_KEYS + IMPORT_KEYS:
            _resolve_paths({section: values[section]}, Path.cwd())  # command-line paths: the working dir
    cfg = _build(RunConfig, values, "")
    if check:
        check_config(cfg)
    return cfg


def check_config(cfg: RunConfig) -> None:
    """The checks that need the family: arch, data set, options, and that it feeds the scorer."""
    from pipelines.families import family_for  # here: the families import torch and their model code
    from pipelines.methods.scorers import check_scorer

    family = family_for(cfg)
    family.check(cfg)
    check_scorer(cfg, family)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file (see ``configs/``); its paths resolve against its folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; name a YAML file (e.g. configs/tiny.yaml)")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; check the path (e.g. configs/tiny.yaml)")
    with reading(path, "config file", "it must be UTF-8 text holding YAML", ConfigError):
        text = path.read_text(encoding="utf-8")
    values = load_yaml(text, str(path))
    if values is None:
        raise ConfigError(f"config file {path} is empty; write its sections (data:, model:, ...), e.g. copy "
                          "configs/tiny.yaml")
    return parse_config(values, overrides, base=path.resolve().parent)


def _override(values: dict[str, Any], item: str) -> tuple[str, str, Any]:
    """Apply one ``a.b=value`` override in place; returns (section, key, parsed value)."""
    path, eq, raw = item.partition("=")
    if not eq or not path.strip(". "):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. --set featurize.k=512")
    try:
        value = load_yaml(raw, f"override {item!r}")
    except ConfigError as exc:
        raise ConfigError(f"override {item!r}: {raw!r} is not a YAML value ({exc}); quote strings") from exc
    parts = path.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value
    return (parts[0], parts[1], value) if len(parts) == 2 else ("", "", value)


def _resolve_paths(values: dict[str, Any], base: Path) -> None:
    """Make every path-valued key of ``values`` absolute against ``base`` (in place)."""
    for section, key in PATH_KEYS:
        node = values.get(section)
        if not isinstance(node, dict) or node.get(key) is None:
            continue
        if key == "checkpoints":
            node[key] = _checkpoint_files(node[key], base)
        elif isinstance(node[key], str):
            node[key] = _absolute(node[key], base)
    for section, key in IMPORT_KEYS:
        node = values.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and ".py:" in node[key]:
            file, _, name = node[key].rpartition(":")
            node[key] = f"{_absolute(file, base)}:{name}"


def _absolute(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p).resolve())


MANIFEST = "tda-checkpoints.json"


def _checkpoint_files(value: Any, base: Path) -> list[str]:
    """``model.checkpoints``: a path, a glob or a list of them -> sorted absolute file paths."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"model.checkpoints must be a path, a glob or a list of them, got {value!r}")
    files: list[str] = []
    for item in items:
        pattern = _absolute(item, base)
        if glob.has_magic(pattern):
            hits = sorted(glob.glob(pattern))
            if not hits:
                raise ConfigError(f"model.checkpoints: no file matches {item!r} (looked for {pattern}); check the pattern "
                                  "(relative paths resolve against the config file's folder)")
            files += hits
        elif Path(pattern).is_dir() and (Path(pattern) / MANIFEST).is_file():
            files += recorded_files(Path(pattern))
        else:
            files.append(pattern)
    return files


def recorded_files(folder: Path) -> list[str]:
    """The checkpoints a recorder listed in ``folder/tda-checkpoints.json``, in recorded order."""
    from tda.models.recording import read_manifest

    manifest = read_manifest(folder) or {}
    files = [str(folder / e["file"]) for e in manifest.get("checkpoints", [])]
    if not files:
        raise ConfigError(f"model.checkpoints: {folder / MANIFEST} lists no checkpoints; train with the recorder first")
    return files
