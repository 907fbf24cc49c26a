"""The labels ``tda run`` records for the torch-free ``tda query`` path, in a folder (the run's
``labels/``, ``RunPaths.labels``):

- ``labels.npz``: per split ``{split}_ids`` and ``{split}_labels``, and for classifiers the
  queries' predictions ``query_pred_ids``, ``query_predicted`` and ``query_p_predicted``;
- ``texts.npz``: per split of text data ``{split}_ids``, ``{split}_offsets`` (UTF-8 byte offsets)
  and ``{split}_bytes``;
- ``labels.json``, the marker, written last: the feature stores' fingerprints (``train``,
  ``query``) the labels were recorded for, the sha256 of ``labels.npz``, ``class_names``, and
  ``texts`` (``recorded`` with ``texts_sha256``, ``none`` or ``too large``).

Every reader checks the sha256 and the fingerprints (passed in by the caller) and raises
:class:`NotRecorded` when the files cannot be used, so the caller reads the data instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stores._io import save_json, save_npz, sha256_file

LABELS_FILE, TEXTS_FILE, MARKER_FILE = "labels.npz", "texts.npz", "labels.json"
#: texts are recorded up to this many UTF-8 bytes in all; longer ones are read from the data set
TEXT_BYTES_MAX = 16 * 2**20
SPLITS = ("train", "query")


class NotRecorded(Exception):
    """The recorded labels are missing, damaged, stale or incomplete; read them from the data."""


def exists(folder: Path) -> bool:
    """Whether labels were recorded (current or not: :func:`load_arrays` checks)."""
    return (Path(folder) / MARKER_FILE).is_file() and (Path(folder) / LABELS_FILE).is_file()


def label_arrays(labels: Mapping[str, Mapping[int, Any]]) -> dict[str, np.ndarray] | None:
    """``{split}_ids`` and ``{split}_labels`` of ``split -> {id: label}``; None when a split's
    labels are not numbers or strings (numpy cannot store them without pickle)."""
    arrays = {}
    for split in SPLITS:
        values = np.asarray(list(labels[split].values()))
        if values.dtype.kind not in "biufU":
            return None
        arrays[f"{split}_ids"], arrays[f"{split}_labels"] = np.asarray(list(labels[split]), dtype=np.int64), values
    return arrays


def discard(folder: Path) -> None:
    """Remove ``labels.npz`` (the labels cannot be recorded): the marker then matches nothing."""
    (Path(folder) / LABELS_FILE).unlink(missing_ok=True)


def save(folder: Path, arrays: dict[str, np.ndarray], *, fingerprints: dict[str, str], class_names: Any,
         texts: Mapping[str, Mapping[int, str]], text_bytes_max: int = TEXT_BYTES_MAX) -> None:
    """Write ``labels.npz`` (:func:`label_arrays` and the predictions), ``texts.npz`` and last the
    marker, each atomically and only when it changed (a rerun rewrites nothing)."""
    folder = Path(folder)
    npz = folder / LABELS_FILE
    if not _same_arrays(npz, arrays):
        save_npz(npz, **arrays)
    record = {**fingerprints, "sha256": sha256_file(npz), "class_names": class_names,
              **_save_texts(folder, texts, text_bytes_max)}
    if marker(folder) != record:
        save_json(folder / MARKER_FILE, record)


def _save_texts(folder: Path, texts: Mapping[str, Mapping[int, str]], limit: int) -> dict[str, Any]:
    """Write ``texts.npz``; the marker's ``texts`` and ``texts_sha256`` entries."""
    path = folder / TEXTS_FILE
    arrays: dict[str, np.ndarray] = {}
    chars = sum(len(t) for table in texts.values() for t in table.values())  # at most the UTF-8 bytes
    for split, table in texts.items() if chars <= limit else ():
        encoded = [t.encode("utf-8") for t in table.values()]
        arrays[f"{split}_ids"] = np.fromiter(table, dtype=np.int64, count=len(table))
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    size = sum(a.size for k, a in arrays.items() if k.endswith("_bytes"))
    state = "none" if not any(texts.values()) else "too large" if max(chars, size) > limit else "recorded"
    if state != "recorded":
        path.unlink(missing_ok=True)
        return {"texts": state, "texts_sha256": None}
    if not _same_arrays(path, arrays):
        save_npz(path, **arrays)
    return {"texts": state, "texts_sha256": sha256_file(path)}


def _same_arrays(npz: Path, arrays: dict[str, np.ndarray]) -> bool:
    try:
        with np.load(npz, allow_pickle=False) as z:
            return set(z.files) == set(arrays) and all(np.array_equal(z[k], v) for k, v in arrays.items())
    except (OSError, ValueError):
        return False


def marker(folder: Path) -> dict[str, Any]:
    """``labels.json`` (empty when missing or unreadable)."""
    try:
        record = json.loads((Path(folder) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def load_arrays(folder: Path, fingerprints: dict[str, str]) -> dict[str, np.ndarray]:
    """The arrays of ``labels.npz``, checked against the marker's sha256 and against the
    ``fingerprints`` (split -> the feature store's fingerprint now); :class:`NotRecorded` if not."""
    npz, record = Path(folder) / LABELS_FILE, marker(folder)
    want = record.get("sha256")
    if want is None or not npz.is_file() or sha256_file(npz) != want:
        raise NotRecorded("no recorded labels")
    if any(record.get(split) != fp for split, fp in fingerprints.items()):
        raise NotRecorded("the labels were recorded for other features")
    with np.load(npz, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def labels_of(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[int, Any]]:
    """``split -> {id: label}`` from the arrays of :func:`load_arrays`."""
    return {split: dict(zip(arrays[f"{split}_ids"].tolist(), arrays[f"{split}_labels"].tolist()))
            for split in SPLITS}


def prediction_map(arrays: Mapping[str, np.ndarray]) -> dict[int, tuple[int, float]] | None:
    """``query id -> (predicted class, probability)`` from the arrays (None: no predictions)."""
    if "query_predicted" not in arrays:
        return None
    return {int(i): (int(c), float(p)) for i, c, p in
            zip(arrays["query_pred_ids"], arrays["query_predicted"], arrays["query_p_predicted"])}


class StoredTexts(Mapping):
    """``id -> text`` of one split read from ``texts.npz``; each text decoded when asked for."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, blob: np.ndarray) -> None:
        self.rows = {int(i): r for r, i in enumerate(ids.tolist())}
        self.offsets, self.blob = offsets, blob

    def __getitem__(self, example: int) -> str:
        r = self.rows[int(example)]
        return self.blob[self.offsets[r]: self.offsets[r + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[int]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Recorded:
    """What was recorded: ``split -> {id: label}``, the class names, ``split -> texts``."""

    labels: dict[str, dict[int, Any]]
    names: list[str] | None
    texts: dict[str, Mapping[int, str]]


def load(folder: Path, fingerprints: dict[str, str]) -> Recorded:
    """Labels, class names and texts, checked; :class:`NotRecorded` when missing, damaged, recorded
    for other feature stores or by a version without names and texts, or when the texts were too
    long to record."""
    labels, record = labels_of(load_arrays(folder, fingerprints)), marker(folder)
    if "texts" not in record:
        raise NotRecorded("the labels were recorded without class names and texts")
    if record["texts"] == "too large":
        raise NotRecorded("the texts are too long to be recorded")
    texts: dict[str, Mapping[int, str]] = {}
    if record["texts"] == "recorded":
        path = Path(folder) / TEXTS_FILE
        if not path.is_file() or sha256_file(path) != record.get("texts_sha256"):
            raise NotRecorded("the recorded texts are missing or damaged")
        with np.load(path, allow_pickle=False) as z:
            texts = {split: StoredTexts(z[f"{split}_ids"], z[f"{split}_offsets"], z[f"{split}_bytes"])
                     for split in SPLITS if f"{split}_ids" in z.files}
    return Recorded(labels, record.get("class_names"), texts)
