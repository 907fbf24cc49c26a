"""``tda query`` without torch: the answer from stored features, the fitted scorer state and the index.

The common question, the top-k proponents and opponents of a run's own query (or training)
examples, needs no model when the scorer's query transform is numpy (the methods declaring
``lean``, :class:`pipelines.method.Method`): TRAK (whitening by the kernel's Cholesky factor,
:mod:`tda.scorers.trak`), TracIn (the ``sqrt(eta)``-weighted concatenation; its learning rates
are in the fitted state), Grad-Dot and Grad-Cos. This module
reads the recorded config (without the family's checks, so without importing the family), the
scorer state, the stored features, the FAISS index and the labels, class names and texts ``tda
run`` recorded (``labels/``), with numpy and faiss only: it starts in a fraction of ``import torch``.

Whenever it cannot answer exactly as the full path would (another scorer, per-slot features that
need the model, a fitted state or index failing a fingerprint or sha256 check, labels not
recorded, stale, recorded by an older version, or texts too long to record), it raises
:class:`NotLean` and the caller takes the full path
(:mod:`pipelines.cli_query`), which answers or raises the error naming the fix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stores import FaissIndex, FeatureStore
from stores._io import save_json, save_npz, sha256_file
from stores.index import index_space
from tda.errors import QueryError, StoreError, TDAError
from tda.features import FeatureBlock

from .layout import LABELS_DIR, RunPaths, json_field
from .method import find_method
from .report import label_fields, label_name, text_fields
from .run_folder import QUERY_NEEDS, RunLabels, check_complete, dataset_labels, recorded_config, stored_features
from .schema import RunConfig, scorer_fingerprint

#: families whose gradient scorers run per draw (``SlotScorer``, whose width needs the model): a
#: method that may score ``slots`` features is not lean on them (TRAK, scoring the grid, is)
SLOT_FAMILIES = ("diffusion",)
#: texts are recorded for the lean path up to this many UTF-8 bytes in all; longer ones are read
#: from the data set by the full path
TEXT_BYTES_MAX = 16 * 2**20


class NotLean(Exception):
    """The numpy-only path cannot answer this question exactly; take the full path."""


@dataclass
class Answer:
    """Top-k of some examples. ``top``: ``proponent_ids`` / ``proponent_scores`` / ``opponent_ids`` /
    ``opponent_scores``, each (m, k); ``labels``: train id -> label; ``qlabels``: example id -> label;
    ``names``: the class names; ``texts`` / ``qtexts``: train / example id -> text (None: no texts),
    shown cut at ``chars`` characters (None: whole)."""

    ids: list[int]
    top: dict[str, np.ndarray]
    labels: dict[int, Any]
    qlabels: dict[int, Any]
    scorer: str
    n_index: int
    kind: str
    elapsed: float
    search: float
    #: example id -> (predicted class, its probability) over the attributed checkpoints (classifiers)
    predicted: dict[int, tuple[int, float]] | None = None
    names: list[str] | None = None
    texts: Mapping[int, str] | None = None
    qtexts: Mapping[int, str] | None = None
    chars: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: per example its label (and ``label_name``), prediction (and ``predicted_name``),
        ``text`` (text data), proponents and opponents with labels, names, scores and texts."""
        rows = []
        for r, example in enumerate(self.ids):
            row: dict[str, Any] = {"id": int(example), **label_fields(self.qlabels.get(int(example)), self.names)}
            if self.predicted and int(example) in self.predicted:
                row["predicted"], row["p_predicted"] = self.predicted[int(example)]
                row["predicted_name"] = label_name(row["predicted"], self.names)
            row.update(text_fields((self.qtexts or {}).get(int(example)), self.chars))
            for kind in ("proponent", "opponent"):
                row[kind + "s"] = [self.train_row(int(i), float(v))
                                   for i, v in zip(self.top[f"{kind}_ids"][r], self.top[f"{kind}_scores"][r])]
            rows.append(row)
        return {"scorer": self.scorer, "index": self.kind, "indexed": self.n_index, "queries": rows,
                "elapsed_ms": self.elapsed * 1000, "search_ms": self.search * 1000}

    def train_row(self, example: int, score: float) -> dict[str, Any]:
        """JSON of one listed training example: id, label, label name, score, text."""
        return {"id": example, **label_fields(self.labels.get(example), self.names), "score": score,
                **text_fields((self.texts or {}).get(example), self.chars)}


def check_k(k: int, n: int, name: str = "-k") -> None:
    """``k`` (``name``: the CLI flag ``-k``, or the HTTP field ``k``) must be between 1 and the
    number of indexed training examples."""
    if not 1 <= k <= n:
        raise QueryError(f"{name} must be between 1 and the {n} indexed training examples, got {k}")


def search(index: FaissIndex, vectors: np.ndarray, k: int) -> tuple[dict[str, np.ndarray], float]:
    """Top-k proponents and opponents of every row of ``vectors`` (m, D) in one search; seconds spent."""
    t = time.time()
    top = index.top_k(vectors, k)
    return {"proponent_ids": top.proponent_ids, "proponent_scores": top.proponent_scores,
            "opponent_ids": top.opponent_ids, "opponent_scores": top.opponent_scores}, time.time() - t


def lean_scorer(cfg: RunConfig, paths: RunPaths) -> Any:
    """The fitted scorer from its saved state, with the checks of the full path's ``load_scorer``;
    :class:`NotLean` when that needs the model or a check fails (the full path then names the fix)."""
    name, method = cfg.score.scorer, find_method(cfg.score.scorer)  # lean: its query transform is numpy
    if method is None or method.lean is None or ("slots" in method.kinds and cfg.model.family in SLOT_FAMILIES):
        raise NotLean(f"the {name} scorer of a {cfg.model.family} run needs the full path")
    state_path = paths.scorer / "state.npz"
    marker = paths.scorer / "scorer.json"
    want = json_field(marker, "sha256")
    if (not state_path.is_file() or json_field(marker, "fingerprint") != scorer_fingerprint(cfg)
            or (want is not None and sha256_file(state_path) != want)):
        raise NotLean("the fitted scorer is missing, stale or damaged")
    with np.load(state_path, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    try:
        return method.lean(cfg, state)
    except TDAError as exc:
        raise NotLean(str(exc)) from exc


def lean_index(cfg: RunConfig, paths: RunPaths, scorer: Any, dim: int) -> FaissIndex:
    """The run's index, checked as the full path's ``load_index`` checks it; :class:`NotLean` if not."""
    if not (paths.index / "index.json").is_file():
        raise NotLean("no finished index")
    try:
        index = FaissIndex.load(paths.index)  # checked against its sha256
        return index.check(fingerprint=scorer_fingerprint(cfg), dim=dim, n=FeatureStore.open(paths.store("train")).n,
                           space=index_space(scorer))
    except TDAError as exc:
        raise NotLean(str(exc)) from exc


def _store_fingerprints(paths: RunPaths) -> dict[str, str]:
    return {split: FeatureStore.open(paths.store(split)).manifest["fingerprint"] for split in ("train", "query")}


def write_labels(cfg: RunConfig, paths: RunPaths) -> bool:
    """Record what ``tda query`` prints for the lean path, keyed by the feature stores' fingerprints;
    under the run lock, after the score stage: the labels of both splits (``data.label_column``) and
    the queries' predictions (``labels.npz``), the class names (``labels.json``) and the texts of text
    data (``texts.npz``, up to :data:`TEXT_BYTES_MAX`). Labels numpy cannot store without pickle are
    not recorded (the full path then reads the data)."""
    meta = dataset_labels(cfg, paths)  # the data sets (and the family) only here
    marker, npz = paths.root / LABELS_DIR / "labels.json", paths.root / LABELS_DIR / "labels.npz"
    arrays = {}
    for split in ("train", "query"):
        labels = meta.labels[split]
        values = np.asarray(list(labels.values()))
        if values.dtype.kind not in "biufU":
            npz.unlink(missing_ok=True)
            return False
        arrays[f"{split}_ids"], arrays[f"{split}_labels"] = np.asarray(list(labels), dtype=np.int64), values
    arrays.update(_predictions(cfg, paths))
    if not _same_arrays(npz, arrays):  # a rerun rewrites nothing
        save_npz(npz, **arrays)
    record = {**_store_fingerprints(paths), "sha256": sha256_file(npz), "class_names": meta.names,
              **_write_texts(paths, meta.texts)}
    if _marker(paths) != record:
        save_json(marker, record)
    return True


def _write_texts(paths: RunPaths, texts: dict[str, Mapping[int, str]]) -> dict[str, Any]:
    """Write ``texts.npz`` (per split: ids, UTF-8 offsets and bytes); the marker's ``texts`` entry:
    ``recorded`` (with ``texts_sha256``), ``none`` (no text data) or ``too large``."""
    path = paths.root / LABELS_DIR / "texts.npz"
    arrays: dict[str, np.ndarray] = {}
    chars = sum(len(t) for table in texts.values() for t in table.values())  # at most the UTF-8 bytes
    for split, table in texts.items() if chars <= TEXT_BYTES_MAX else ():
        encoded = [t.encode("utf-8") for t in table.values()]
        arrays[f"{split}_ids"] = np.fromiter(table, dtype=np.int64, count=len(table))
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    size = sum(a.size for k, a in arrays.items() if k.endswith("_bytes"))
    state = ("none" if not any(texts.values()) else "too large" if max(chars, size) > TEXT_BYTES_MAX
             else "recorded")
    if state != "recorded":
        path.unlink(missing_ok=True)
        return {"texts": state, "texts_sha256": None}
    if not _same_arrays(path, arrays):
        save_npz(path, **arrays)
    return {"texts": state, "texts_sha256": sha256_file(path)}


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


def _same_arrays(npz, arrays: dict[str, np.ndarray]) -> bool:
    try:
        with np.load(npz, allow_pickle=False) as z:
            return set(z.files) == set(arrays) and all(np.array_equal(z[k], v) for k, v in arrays.items())
    except (OSError, ValueError):
        return False


def _predictions(cfg: RunConfig, paths: RunPaths) -> dict[str, np.ndarray]:
    """Predicted class and its probability per query, as arrays (families with classes only)."""
    from .families import family_for

    family = family_for(cfg)
    if not hasattr(family, "example_predictions") or not family.unlearning_hits_of(cfg):
        return {}  # no classes (an LM, a diffusion model)
    preds = family.example_predictions(cfg, paths, split="query")
    return {"query_pred_ids": np.asarray(preds["ids"], dtype=np.int64), "query_predicted": preds["predicted"],
            "query_p_predicted": preds["p_predicted"]}


def _prediction_map(arrays) -> dict[int, tuple[int, float]] | None:
    if "query_predicted" not in arrays:
        return None
    return {int(i): (int(c), float(p)) for i, c, p in
            zip(arrays["query_pred_ids"], arrays["query_predicted"], arrays["query_p_predicted"])}


def _marker(paths: RunPaths) -> dict[str, Any]:
    """``labels/labels.json`` (empty when missing or unreadable)."""
    try:
        record = json.loads((paths.root / LABELS_DIR / "labels.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded(paths: RunPaths) -> dict[str, np.ndarray]:
    """The arrays :func:`write_labels` recorded; :class:`NotLean` when missing, damaged or
    recorded for other feature stores."""
    npz, record = paths.root / LABELS_DIR / "labels.npz", _marker(paths)
    want = record.get("sha256")
    if want is None or not npz.is_file() or sha256_file(npz) != want:
        raise NotLean("no recorded labels")
    if any(record.get(split) != fp for split, fp in _store_fingerprints(paths).items()):
        raise NotLean("the labels were recorded for other features")
    with np.load(npz, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def labels_current(paths: RunPaths) -> bool:
    """Whether :func:`write_labels` recorded labels for the run's current feature stores, intact."""
    try:
        _recorded(paths)
    except (NotLean, StoreError):
        return False
    return True


def load_predictions(paths: RunPaths) -> dict[int, tuple[int, float]] | None:
    """``query id -> (predicted, probability)`` recorded by :func:`write_labels` (None: not
    recorded, or recorded for other features)."""
    try:
        return _prediction_map(_recorded(paths))
    except NotLean:
        return None


def query_predictions(cfg: RunConfig, paths: RunPaths) -> dict[int, tuple[int, float]] | None:
    """The recorded predictions, else computed from the checkpoints (None: the family has no classes)."""
    recorded = load_predictions(paths)
    return recorded if recorded is not None else _prediction_map(_predictions(cfg, paths))


def load_labels(paths: RunPaths) -> dict[str, dict[int, Any]]:
    """``split -> {id: label}`` that :func:`write_labels` recorded; :class:`NotLean` when missing,
    damaged or recorded for other feature stores."""
    arrays = _recorded(paths)
    return {split: dict(zip(arrays[f"{split}_ids"].tolist(), arrays[f"{split}_labels"].tolist()))
            for split in ("train", "query")}


def recorded_labels(paths: RunPaths) -> RunLabels:
    """Labels, class names and texts :func:`write_labels` recorded; :class:`NotLean` when missing,
    damaged, recorded for other feature stores or by a version without names and texts, or when
    the texts were too long to record."""
    labels, record = load_labels(paths), _marker(paths)
    if "texts" not in record:
        raise NotLean("the labels were recorded without class names and texts")
    if record["texts"] == "too large":
        raise NotLean("the texts are too long to be recorded")
    texts: dict[str, Mapping[int, str]] = {}
    if record["texts"] == "recorded":
        path = paths.root / LABELS_DIR / "texts.npz"
        if not path.is_file() or sha256_file(path) != record.get("texts_sha256"):
            raise NotLean("the recorded texts are missing or damaged")
        with np.load(path, allow_pickle=False) as z:
            texts = {split: StoredTexts(z[f"{split}_ids"], z[f"{split}_offsets"], z[f"{split}_bytes"])
                     for split in ("train", "query") if f"{split}_ids" in z.files}
    return RunLabels(labels, record.get("class_names"), texts)


@dataclass
class LoadedRun:
    """A finished run loaded for answering stored examples: the config, the fitted scorer, the
    index, the labels, the class names and the texts (:func:`load_lean`)."""

    cfg: RunConfig
    paths: RunPaths
    scorer: Any
    index: FaissIndex | None
    labels: dict[str, dict[int, Any]] | None
    names: list[str] | None = None
    texts: dict[str, Mapping[int, str]] | None = None

    def set_labels(self, meta: RunLabels) -> "LoadedRun":
        """Take the labels, class names and texts of ``meta``; the run itself."""
        self.labels, self.names, self.texts = meta.labels, meta.names, meta.texts
        return self

    def features(self, examples: list[int], split: str) -> FeatureBlock:
        """Stored features of ``examples`` (QueryError naming the id range when one is not stored)."""
        return stored_features(self.paths, examples, split)

    def answer(self, examples: list[int], split: str, k: int, vectors: np.ndarray | None = None) -> Answer:
        """Top-k of stored ``examples`` of ``split`` (``vectors``: their query vectors, if known)."""
        t0 = time.time()
        if vectors is None:
            vectors = self.scorer.transform_query(self.features(examples, split))  # (m, D)
        if self.index is None:
            self.index = lean_index(self.cfg, self.paths, self.scorer, vectors.shape[1])
        check_k(k, len(self.index))
        if self.labels is None:
            self.set_labels(recorded_labels(self.paths))
        top, spent = search(self.index, vectors, k)
        texts = self.texts or {}
        return Answer(list(examples), top, self.labels["train"], self.labels[split], self.cfg.score.scorer,
                      len(self.index), self.index.meta["kind"], time.time() - t0, spent,
                      load_predictions(self.paths) if split == "query" else None, self.names,
                      texts.get("train"), texts.get(split), getattr(self.cfg.score, "text_chars", None))


def load_lean(paths: RunPaths) -> LoadedRun:
    """The recorded config and the fitted scorer of a finished run (the index and labels load with
    the first answer); errors of the run folder itself are raised as the full path raises them."""
    cfg = recorded_config(paths, check=False)
    check_complete(paths, QUERY_NEEDS, f"`tda run CONFIG --out {paths.root}`")
    return LoadedRun(cfg, paths, lean_scorer(cfg, paths), None, None)


def lean_answer(paths: RunPaths, examples: list[int], split: str, k: int) -> Answer:
    """``tda query`` on stored examples with numpy and faiss only; :class:`NotLean` if it cannot."""
    return load_lean(paths).answer(examples, split, k)
