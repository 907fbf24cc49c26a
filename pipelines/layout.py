"""Where each artifact of a run folder lives: pure functions of the folder, and small readers.

Nothing here knows a model family or a stage, so every other module may import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tda.errors import CheckpointError, StoreCorruptError

RUN_FILE = "run.json"
#: The run folder's cache of input digests (see :mod:`stores.digests`).
INPUTS_FILE = "inputs.json"
#: the labels ``tda run`` records for the lean path (:mod:`pipelines.query.lean`, files: :mod:`stores.labels`):
#: ``labels/labels.npz`` and its marker ``labels/labels.json`` (which also holds the class names), and the
#: texts of text data in ``labels/texts.npz``
LABELS_DIR = "labels"
#: The fingerprint scheme of the run folders made now, recorded in ``run.json`` as ``fingerprint_version``:
#: 2 hashes ``featurize`` as the chosen projection's typed spec (:func:`pipelines.spec.fingerprints.section_fingerprint`);
#: 1 (a ``run.json`` without the field) hashed every ``featurize`` key, used or not.
FINGERPRINT_VERSION = 2


@dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives."""

    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint_list(self) -> Path:
        return self.checkpoints / "checkpoints.json"

    def checkpoint(self, model: int, epoch: int) -> Path:
        return self.checkpoints / f"model-{model:02d}-epoch-{epoch:03d}.pt"

    def checkpoint_file(self, entry: dict[str, Any]) -> Path:
        """The file of a ``checkpoints.json`` entry: a name in ``checkpoints/`` or, for checkpoints
        trained elsewhere (``model.checkpoints``), an absolute path."""
        return self.checkpoints / entry["file"]

    def store(self, split: str) -> Path:
        return self.root / f"features-{split}"

    @property
    def scorer(self) -> Path:
        return self.root / "scorer"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def labels(self) -> Path:
        """The labels recorded for the lean ``tda query`` path (files: :mod:`stores.labels`)."""
        return self.root / LABELS_DIR

    @property
    def airrep(self) -> Path:
        return self.root / "airrep"


def fingerprint_version(paths: "RunPaths | None") -> int:
    """The fingerprint scheme a run folder's records were written under, which every check and
    every new record of the folder keeps: the ``fingerprint_version`` of its ``run.json``; 1 for a
    ``run.json`` written before schemes were recorded; :data:`FINGERPRINT_VERSION` without one."""
    if paths is None or not paths.run_file.is_file():
        return FINGERPRINT_VERSION
    version = json_field(paths.run_file, "fingerprint_version")
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


def checkpoint_digest(path: Path) -> str:
    """sha256 of a checkpoint file, or of the weight files of a ``save_pretrained`` folder."""
    from stores._io import fingerprint, sha256_file

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        return fingerprint({p.name: sha256_file(p) for p in files})
    return sha256_file(path)


def load_checkpoint_list(paths: RunPaths) -> list[dict[str, Any]]:
    """The attributed checkpoints recorded by the train stage (``checkpoints.json``)."""
    if not paths.checkpoint_list.is_file():
        raise CheckpointError(f"{paths.checkpoint_list} is missing; run the train stage first")
    try:
        entries = json.loads(paths.checkpoint_list.read_text())["checkpoints"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
            raise ValueError("its 'checkpoints' is not a list of entries with a 'file'")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreCorruptError(f"{paths.checkpoint_list} is damaged ({type(exc).__name__}: {exc}); rerun "
                                f"`tda run CONFIG --out {paths.root}`: the train stage rewrites it") from exc
    return entries


def json_field(path: Path, key: str) -> Any:
    """``key`` of a JSON file, or None when the file is missing or unreadable (then the work is redone)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj.get(key) if isinstance(obj, dict) else None
