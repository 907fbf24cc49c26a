"""``tda query`` without torch: the answer from stored features, the fitted scorer state and the index.

The common question, the top-k proponents and opponents of a run's own query (or training)
examples, needs no model when the scorer's query transform is numpy (the methods declaring
``lean``, :class:`pipelines.spec.method.Method`): TRAK (whitening by the kernel's Cholesky factor,
:mod:`tda.scorers.trak`), TracIn (the ``sqrt(eta)``-weighted concatenation; its learning rates
are in the fitted state), Grad-Dot and Grad-Cos. This module
reads the recorded config (without the family's checks, so without importing the family), the
scorer state, the stored features, the FAISS index and the labels, class names and texts ``tda
run`` recorded (``labels/``), with numpy and faiss only: it starts in a fraction of ``import torch``.

Whenever it cannot answer exactly as the full path would (another scorer, per-slot features that
need the model, a fitted state or index failing a fingerprint or sha256 check, labels not
recorded, stale, recorded by an older version, or texts too long to record), it raises
:class:`NotLean` and the caller takes the full path
(:mod:`pipelines.cli.query`), which answers or raises the error naming the fix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stores import FaissIndex, FeatureStore, index_files, scorer_state
from stores import labels as label_files
from stores.index import index_space
from tda.errors import QueryError, StoreError, TDAError
from tda.core.features import FeatureBlock

from pipelines.layout import RunPaths, fingerprint_version
from pipelines.spec.method import find_method
from pipelines.report import label_fields, label_name, text_fields
from pipelines.run_folder import QUERY_NEEDS, RunLabels, check_complete, dataset_labels, recorded_config, stored_features
from pipelines.spec.schema import RunConfig
from pipelines.spec.fingerprints import scorer_fingerprint

#: families whose gradient scorers run per draw (``SlotScorer``, whose width needs the model): a
#: method that may score ``slots`` features is not lean on them (TRAK, scoring the grid, is)
SLOT_FAMILIES = ("diffusion",)
#: texts are recorded for the lean path up to this many UTF-8 bytes in all; longer ones are read
#: from the data set by the full path (read when labels are written, so a test may lower it)
TEXT_BYTES_MAX = label_files.TEXT_BYTES_MAX


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
    """The fitted scorer from its saved state, read and checked by :func:`stores.scorer_state.load` as
    the full path's ``load_scorer`` reads it; :class:`NotLean` when that needs the model or a check
    fails (the full path then names the fix)."""
    name, method = cfg.score.scorer, find_method(cfg.score.scorer)  # lean: its query transform is numpy
    if method is None or method.lean is None or ("slots" in method.kinds and cfg.model.family in SLOT_FAMILIES):
        raise NotLean(f"the {name} scorer of a {cfg.model.family} run needs the full path")
    try:
        state = scorer_state.load(paths.scorer, scorer_fingerprint(cfg, fingerprint_version(paths)))  # as the full path
    except StoreError as exc:
        raise NotLean("the fitted scorer is missing, stale or damaged") from exc
    try:
        return method.lean(cfg, state)
    except TDAError as exc:
        raise NotLean(str(exc)) from exc


def lean_index(cfg: RunConfig, paths: RunPaths, scorer: Any, dim: int) -> FaissIndex:
    """The run's index, read and checked by :func:`stores.index_files.load` as the full path's
    ``load_index`` reads it; :class:`NotLean` if not."""
    if not index_files.exists(paths.index):
        raise NotLean("no finished index")
    try:
        return index_files.load(paths.index, fingerprint=scorer_fingerprint(cfg, fingerprint_version(paths)), dim=dim,
                                n=FeatureStore.open(paths.store("train")).n, space=index_space(scorer))
    except TDAError as exc:
        raise NotLean(str(exc)) from exc


def _store_fingerprints(paths: RunPaths) -> dict[str, str]:
    return {split: FeatureStore.open(paths.store(split)).manifest["fingerprint"] for split in ("train", "query")}


def write_labels(cfg: RunConfig, paths: RunPaths) -> bool:
    """Record what ``tda query`` prints for the lean path (:mod:`stores.labels`), keyed by the
    feature stores' fingerprints; under the run lock, after the score stage: the labels of both
    splits (``data.label_column``) and the queries' predictions (``labels.npz``), the class names
    (``labels.json``) and the texts of text data (``texts.npz``, up to :data:`TEXT_BYTES_MAX`).
    Labels numpy cannot store without pickle are not recorded (the full path then reads the data)."""
    meta = dataset_labels(cfg, paths)  # the data sets (and the family) only here
    folder = paths.labels
    arrays = label_files.label_arrays(meta.labels)
    if arrays is None:
        label_files.discard(folder)
        return False
    label_files.save(folder, {**arrays, **_predictions(cfg, paths)}, fingerprints=_store_fingerprints(paths),
                     class_names=meta.names, texts=meta.texts, text_bytes_max=TEXT_BYTES_MAX)
    return True


def _predictions(cfg: RunConfig, paths: RunPaths) -> dict[str, np.ndarray]:
    """Predicted class and its probability per query, as arrays (families with classes only)."""
    from pipelines.families import family_for

    family = family_for(cfg)
    if not hasattr(family, "example_predictions") or not family.unlearning_hits_of(cfg):
        return {}  # no classes (an LM, a diffusion model)
    preds = family.example_predictions(cfg, paths, split="query")
    return {"query_pred_ids": np.asarray(preds["ids"], dtype=np.int64), "query_predicted": preds["predicted"],
            "query_p_predicted": preds["p_predicted"]}


def _recorded(paths: RunPaths) -> dict[str, np.ndarray]:
    """The arrays :func:`write_labels` recorded; :class:`NotLean` when missing, damaged or
    recorded for other feature stores."""
    try:
        return label_files.load_arrays(paths.labels, _store_fingerprints(paths))
    except label_files.NotRecorded as exc:
        raise NotLean(str(exc)) from exc


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
        return label_files.prediction_map(_recorded(paths))
    except NotLean:
        return None


def query_predictions(cfg: RunConfig, paths: RunPaths) -> dict[int, tuple[int, float]] | None:
    """The recorded predictions, else computed from the checkpoints (None: the family has no classes)."""
    recorded = load_predictions(paths)
    return recorded if recorded is not None else label_files.prediction_map(_predictions(cfg, paths))


def load_labels(paths: RunPaths) -> dict[str, dict[int, Any]]:
    """``split -> {id: label}`` that :func:`write_labels` recorded; :class:`NotLean` when missing,
    damaged or recorded for other feature stores."""
    return label_files.labels_of(_recorded(paths))


def recorded_labels(paths: RunPaths) -> RunLabels:
    """Labels, class names and texts :func:`write_labels` recorded (:func:`stores.labels.load`);
    :class:`NotLean` when missing, damaged, recorded for other feature stores or by a version
    without names and texts, or when the texts were too long to record."""
    try:
        got = label_files.load(paths.labels, _store_fingerprints(paths))
    except label_files.NotRecorded as exc:
        raise NotLean(str(exc)) from exc
    return RunLabels(got.labels, got.names, got.texts)


@dataclass
class LoadedRun:
    """A finished run loaded for answering stored examples: the config, the fitted scorer, the
    index, the labels, the class names and the texts (:func:`load_lean`, or
    :func:`pipelines.query.state.load_full` for the full path)."""

    cfg: RunConfig
    paths: RunPaths
    scorer: Any
    index: FaissIndex | None
    labels: dict[str, dict[int, Any]] | None
    names: list[str] | None = None
    texts: dict[str, Mapping[int, str]] | None = None
    #: where the labels, names and texts come from on the first answer (None: :func:`recorded_labels`)
    labels_from: Callable[[], RunLabels] | None = None

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
            self.set_labels(self.labels_from() if self.labels_from is not None else recorded_labels(self.paths))
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
