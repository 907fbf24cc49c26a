"""``tda query`` without torch: the answer from stored features, the fitted scorer state and the index.

The common question, the top-k proponents and opponents of a run's own query (or training)
examples, needs no model when the scorer's query transform is numpy: TRAK (whitening by the
kernel's Cholesky factor, :mod:`tda.scorers.trak`), TracIn (the ``sqrt(eta)``-weighted
concatenation; its learning rates are in the fitted state), Grad-Dot and Grad-Cos. This module
reads the recorded config (without the family's checks, so without importing the family), the
scorer state, the stored features, the FAISS index and the labels ``tda run`` recorded
(``labels/``), with numpy and faiss only: it starts in a fraction of ``import torch``.

Whenever it cannot answer exactly as the full path would (another scorer, per-slot features that
need the model, a fitted state or index failing a fingerprint or sha256 check, labels not
recorded or stale), it raises :class:`NotLean` and the caller takes the full path
(:mod:`pipelines.cli_query`), which answers or raises the error naming the fix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from stores import FaissIndex, FeatureStore
from stores._io import save_json, save_npz, sha256_file
from stores.index import index_space
from tda.errors import QueryError, TDAError
from tda.features import FeatureBlock

from .layout import RunPaths, json_field
from .run_folder import QUERY_NEEDS, check_complete, labels_of, recorded_config, stored_features
from .schema import RunConfig, scorer_fingerprint

#: scorers whose query transform is numpy and whose fitted state holds all it needs
LEAN_SCORERS = ("trak", "tracin", "graddot", "gradcos")
#: families whose gradient scorers run per draw (``SlotScorer``, whose width needs the model): TRAK only
SLOT_FAMILIES = ("diffusion",)
#: the labels ``tda run`` records for the lean path: ``labels/labels.npz`` and its marker ``labels/labels.json``
LABELS_DIR = "labels"


class NotLean(Exception):
    """The numpy-only path cannot answer this question exactly; take the full path."""


@dataclass
class Answer:
    """Top-k of some examples. ``top``: ``proponent_ids`` / ``proponent_scores`` / ``opponent_ids`` /
    ``opponent_scores``, each (m, k); ``labels``: train id -> label; ``qlabels``: example id -> label."""

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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: per example its label, prediction, proponents and opponents with labels and scores."""
        rows = []
        for r, example in enumerate(self.ids):
            row: dict[str, Any] = {"id": int(example), "label": _plain(self.qlabels.get(int(example)))}
            if self.predicted and int(example) in self.predicted:
                row["predicted"], row["p_predicted"] = self.predicted[int(example)]
            for kind in ("proponent", "opponent"):
                row[kind + "s"] = [{"id": int(i), "label": _plain(self.labels.get(int(i))), "score": float(v)}
                                   for i, v in zip(self.top[f"{kind}_ids"][r], self.top[f"{kind}_scores"][r])]
            rows.append(row)
        return {"scorer": self.scorer, "index": self.kind, "indexed": self.n_index, "queries": rows,
                "elapsed_ms": self.elapsed * 1000, "search_ms": self.search * 1000}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def check_k(k: int, n: int) -> None:
    """``-k`` must be between 1 and the number of indexed training examples."""
    if not 1 <= k <= n:
        raise QueryError(f"-k must be between 1 and the {n} indexed training examples, got {k}")


def search(index: FaissIndex, vectors: np.ndarray, k: int) -> tuple[dict[str, np.ndarray], float]:
    """Top-k proponents and opponents of every row of ``vectors`` (m, D) in one search; seconds spent."""
    t = time.time()
    top = index.top_k(vectors, k)
    return {"proponent_ids": top.proponent_ids, "proponent_scores": top.proponent_scores,
            "opponent_ids": top.opponent_ids, "opponent_scores": top.opponent_scores}, time.time() - t


def lean_scorer(cfg: RunConfig, paths: RunPaths) -> Any:
    """The fitted scorer from its saved state, with the checks of the full path's ``load_scorer``;
    :class:`NotLean` when that needs the model or a check fails (the full path then names the fix)."""
    name = cfg.score.scorer
    if name not in LEAN_SCORERS or (name != "trak" and cfg.model.family in SLOT_FAMILIES):
        raise NotLean(f"the {name} scorer of a {cfg.model.family} run needs the full path")
    state_path = paths.scorer / "state.npz"
    marker = paths.scorer / "scorer.json"
    want = json_field(marker, "sha256")
    if (not state_path.is_file() or json_field(marker, "fingerprint") != scorer_fingerprint(cfg)
            or (want is not None and sha256_file(state_path) != want)):
        raise NotLean("the fitted scorer is missing, stale or damaged")
    with np.load(state_path, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    from tda.scorers import GradCosScorer, GradDotScorer, TracInCPScorer, TRAKScorer

    try:
        if name == "trak":
            return TRAKScorer(lambda_rel=cfg.score.lambda_rel).load_state_dict(state)
        if name == "tracin":
            if "learning_rates" not in state:
                raise NotLean("the TracIn state records no learning rates")
            return TracInCPScorer([float(x) for x in state["learning_rates"]]).load_state_dict(state)
        return (GradDotScorer() if name == "graddot" else GradCosScorer()).load_state_dict(state)
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
    """Record the labels ``tda query`` prints (train and query split, the ``label`` column) for the
    lean path, keyed by the feature stores' fingerprints; under the run lock, after the score stage.
    Labels numpy cannot store without pickle are not recorded (the full path then reads the data)."""
    from .run import datasets_for  # the data sets (and the family) only here

    data = datasets_for(cfg, paths)
    marker, npz = paths.root / LABELS_DIR / "labels.json", paths.root / LABELS_DIR / "labels.npz"
    arrays = {}
    for split in ("train", "query"):
        labels = labels_of(data[split])
        values = np.asarray(list(labels.values()))
        if values.dtype.kind not in "biufU":
            npz.unlink(missing_ok=True)
            return False
        arrays[f"{split}_ids"], arrays[f"{split}_labels"] = np.asarray(list(labels), dtype=np.int64), values
    arrays.update(_predictions(cfg, paths))
    if not _same_arrays(npz, arrays):  # a rerun rewrites nothing
        save_npz(npz, **arrays)
    record = {**_store_fingerprints(paths), "sha256": sha256_file(npz)}
    if any(json_field(marker, k) != v for k, v in record.items()):
        save_json(marker, record)
    return True


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
    if not hasattr(family, "example_predictions") or not getattr(family, "unlearning_hits", True):
        return {}  # no classes (an LM, a diffusion model)
    preds = family.example_predictions(cfg, paths, split="query")
    return {"query_pred_ids": np.asarray(preds["ids"], dtype=np.int64), "query_predicted": preds["predicted"],
            "query_p_predicted": preds["p_predicted"]}


def _prediction_map(arrays) -> dict[int, tuple[int, float]] | None:
    if "query_predicted" not in arrays:
        return None
    return {int(i): (int(c), float(p)) for i, c, p in
            zip(arrays["query_pred_ids"], arrays["query_predicted"], arrays["query_p_predicted"])}


def _recorded(paths: RunPaths) -> dict[str, np.ndarray]:
    """The arrays :func:`write_labels` recorded; :class:`NotLean` when missing, damaged or
    recorded for other feature stores."""
    marker, npz = paths.root / LABELS_DIR / "labels.json", paths.root / LABELS_DIR / "labels.npz"
    want = json_field(marker, "sha256")
    if want is None or not npz.is_file() or sha256_file(npz) != want:
        raise NotLean("no recorded labels")
    if any(json_field(marker, split) != fp for split, fp in _store_fingerprints(paths).items()):
        raise NotLean("the labels were recorded for other features")
    with np.load(npz, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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


@dataclass
class LoadedRun:
    """A finished run loaded for answering stored examples: the config, the fitted scorer, the
    index and the labels (:func:`load_lean`)."""

    cfg: RunConfig
    paths: RunPaths
    scorer: Any
    index: FaissIndex | None
    labels: dict[str, dict[int, Any]] | None

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
            self.labels = load_labels(self.paths)
        top, spent = search(self.index, vectors, k)
        return Answer(list(examples), top, self.labels["train"], self.labels[split], self.cfg.score.scorer,
                      len(self.index), self.index.meta["kind"], time.time() - t0, spent,
                      load_predictions(self.paths) if split == "query" else None)


def load_lean(paths: RunPaths) -> LoadedRun:
    """The recorded config and the fitted scorer of a finished run (the index and labels load with
    the first answer); errors of the run folder itself are raised as the full path raises them."""
    cfg = recorded_config(paths, check=False)
    check_complete(paths, QUERY_NEEDS, f"`tda run CONFIG --out {paths.root}`")
    return LoadedRun(cfg, paths, lean_scorer(cfg, paths), None, None)


def lean_answer(paths: RunPaths, examples: list[int], split: str, k: int) -> Answer:
    """``tda query`` on stored examples with numpy and faiss only; :class:`NotLean` if it cannot."""
    return load_lean(paths).answer(examples, split, k)
