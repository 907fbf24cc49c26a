"""What ``tda serve`` holds in memory: a finished run loaded once, answering top-k questions.

At start-up it loads the recorded config, the fitted scorer, the FAISS index and the labels
(numpy-only where :mod:`pipelines.query.lean` can, else through the registry and the family as
the full ``tda query`` path does; with the class names and texts ``tda query`` shows) and
transforms every stored query once (``T_query`` of the
query store, cached: a stored query's answer is then one index search). Training examples asked
as queries are read from the train store and transformed per request (what ``tda query --split
train`` does). New inputs (rows like the run's query data) are featurized on the fly by the
featurize stage's featurizer, collate and batching over the run's checkpoints; the model is
loaded on the first such request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from stores import FeatureStore
from stores.digests import stat_stamp
from tda.errors import DataError, InputChangedError, QueryError, TDAError
from tda.core.features import FeatureBlock

from pipelines.layout import RunPaths
from pipelines.query.lean import Answer, LoadedRun, NotLean, check_k, load_lean, search

logger = logging.getLogger(__name__)


def load_full(paths: RunPaths, examples: list[int] | None = None,
              split: str = "query") -> tuple[LoadedRun, list[int], np.ndarray]:
    """The run loaded as the full ``tda query`` path loads it (torch, the family, the data sets):
    the recorded config (checked), the fitted scorer and the index (:func:`pipelines.stages.load_scorer`,
    :func:`pipelines.stages.load_index`); the labels, names and texts are read from the data sets
    with the first answer. The index is checked against the dimension of the query vectors of
    ``examples`` of ``split`` (default: the first stored query), returned with their ids."""
    from pipelines.run_folder import QUERY_NEEDS, check_complete, dataset_labels, recorded_config, stored_features
    from pipelines.stages import load_index, load_scorer

    cfg = recorded_config(paths)
    check_complete(paths, QUERY_NEEDS, f"`tda run CONFIG --out {paths.root}`")
    scorer = load_scorer(cfg, paths)
    if split != "query" and not scorer.scores_new_inputs:
        raise QueryError(f"the {scorer.name} scorer holds scores of the run's own queries only and cannot score a "
                         f"{split} example; ask with --split query")
    if examples is None:
        examples = [int(FeatureStore.open(paths.store("query")).ids()[0])]
    block = stored_features(paths, examples, split)
    vectors = scorer.transform_query(block)  # (m, D)
    index = load_index(cfg, paths, dim=vectors.shape[1], n_train=FeatureStore.open(paths.store("train")).n,
                       scorer=scorer)
    run = LoadedRun(cfg, paths, scorer, index, None, labels_from=lambda: dataset_labels(cfg, paths))
    return run, [int(i) for i in block.ids], vectors


def query_vectors(run: LoadedRun, block_rows: int = 4096) -> tuple[np.ndarray, dict[int, int]]:
    """``T_query`` of every stored query, (n_query, D) float32, and ``id -> row``."""
    store = FeatureStore.open(run.paths.store("query"))
    ids, parts = [], []
    for blk in store.iter_blocks(block_rows):
        ids.append(np.asarray(blk.ids, dtype=np.int64))
        parts.append(np.asarray(run.scorer.transform_query(blk), dtype=np.float32))
    all_ids = np.concatenate(ids)
    return np.ascontiguousarray(np.concatenate(parts)), {int(i): r for r, i in enumerate(all_ids.tolist())}


class Service:
    """A run loaded once; thread-safe answers (one featurization of new inputs at a time)."""

    def __init__(self, run: LoadedRun, vectors: np.ndarray, rows: dict[int, int], loaded: str = "lean") -> None:
        """``run`` with its index and labels loaded; ``vectors`` (n_query, D): ``T_query`` of the stored
        queries, ``rows``: query id -> row of ``vectors``; ``loaded``: how the run was loaded."""
        self.run, self.vectors, self.rows, self.path = run, vectors, rows, loaded
        self.load_s = 0.0
        self.threads: int | None = None  # FAISS threads per search, set in each request's thread (OpenMP's is per thread)
        self._featurizer: Any = None
        self._template: Any = None
        self._model: Any = None  # the model new inputs' predictions run on (built on the first one)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, paths: RunPaths) -> "Service":
        """A finished run loaded once (numpy-only where it can be), its stored queries transformed."""
        t0 = time.time()
        try:
            run, loaded = load_lean(paths), "lean"
            vectors, rows = query_vectors(run)
            run.answer([next(iter(rows))], "query", 1, vectors[:1])  # loads (and checks) the index and labels
        except NotLean as exc:  # no lean state, or no recorded labels (a run made before they were recorded)
            logger.info("tda serve: loading through the family (%s)", exc)
            (run, _, _), loaded = load_full(paths), "full"
            vectors, rows = query_vectors(run)
            run.answer([next(iter(rows))], "query", 1, vectors[:1])
        service = cls(run, vectors, rows, loaded)
        service.pin_inputs()  # the checkpoints as they are now; a later change stops new-input answers (503)
        service.load_s = time.time() - t0
        return service

    def health(self) -> dict[str, Any]:
        run = self.run
        return {"status": "ok", "run": str(run.paths.root) if run.paths else None, "scorer": run.cfg.score.scorer, "index": run.index.kind,
                "n_train": len(run.index), "n_query": len(self.rows), "dim": int(self.vectors.shape[1]),
                "loaded": self.path, "load_s": round(self.load_s, 3), "model_loaded": self._featurizer is not None}

    def stored(self, ids: list[int], k: int) -> Answer:
        """Top-k of stored queries, from the cached query vectors."""
        self._set_threads()
        check_k(k, len(self.run.index), "k")
        missing = [i for i in ids if i not in self.rows]
        if missing:
            from pipelines.run_folder import missing_ids_error

            root = self.run.paths.root if self.run.paths else "RUN"
            raise missing_ids_error(missing, np.fromiter(self.rows, dtype=np.int64), "query", root)
        return self.run.answer(ids, "query", k, self.vectors[[self.rows[i] for i in ids]])

    def train(self, ids: list[int], k: int) -> Answer:
        """Top-k of training examples asked as queries (their stored features, transformed per request)."""
        self._set_threads()
        self._check_new_inputs("train")
        check_k(k, len(self.run.index), "k")
        return self.run.answer(ids, "train", k)

    def new_inputs(self, rows: list[dict[str, Any]], k: int, label: Any = None) -> Answer:
        """Top-k of new inputs (their ids: -1, -2, ...): rows with the query data's columns; a column
        a row leaves out is empty, and a classifier's row without a label is explained for ``label``
        (an id or a class name) or else for its predicted class. Every answer carries the model's
        predicted class and probability (the last checkpoint of each training run)."""
        self._check_new_inputs("new")
        self._set_threads()
        check_k(k, len(self.run.index), "k")
        with self._lock:  # one featurization at a time (the model is shared)
            self.check_pins()
            rows, predicted = self._complete(rows, label)
            block = self._featurize(rows)
        vectors = self.run.scorer.transform_query(block)
        top, spent = search(self.run.index, vectors, k)
        ids = [int(i) for i in block.ids]
        cfg = self.run.cfg
        given = {i: row.get(cfg.data.label_column, row.get("label", "?")) for i, row in zip(ids, rows)}
        texts = {i: t for i, t in zip(ids, (_text(row, cfg.data.text_column) for row in rows)) if t is not None}
        return Answer(ids, top, self.run.labels["train"], given, cfg.score.scorer, len(self.run.index),
                      self.run.index.kind, spent, spent, dict(zip(ids, predicted)) if predicted else None,
                      self.run.names, (self.run.texts or {}).get("train"), texts, cfg.score.text_chars)

    def _complete(self, rows: list[dict[str, Any]], label: Any) -> tuple[list[dict[str, Any]], list | None]:
        """Rows with every query column (missing ones empty, the label as asked or predicted) and the
        model's ``(class, probability)`` per row (None for a task without classes)."""
        from pipelines.run import datasets_for

        cfg = self.run.cfg
        if self._template is None:
            self._template = datasets_for(cfg, self.run.paths)["query"]
        columns, column = [c for c in self._template.column_names if c != "id"], cfg.data.label_column
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise DataError("rows must be a non-empty list of objects with the query data's columns")
        full = [{**{c: None for c in columns if c != column}, **r} for r in rows]
        if column not in columns:
            return full, None
        if label is not None:
            full = [{**r, column: r.get(column, _label_id(label, self.run.names))} for r in full]
        preds = self._predict([{**r, column: r.get(column, 0)} for r in full])
        full = [{**r, column: r.get(column, int(c))} for r, (c, _) in zip(full, preds)]
        return full, preds

    def _predict(self, rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
        """``(predicted class, probability)`` of each row (mean over the runs' last checkpoints)."""
        from tda.featurizers.predictions import example_predictions

        from pipelines.families import family_for
        from pipelines.families.capabilities import final_checkpoints
        from pipelines.layout import load_checkpoint_list

        cfg, paths = self.run.cfg, self.run.paths
        family = family_for(cfg)
        if self._model is None:  # built once, like the featurizer: a request only loads the checkpoints
            self._model = family.build_model(cfg)
        files = [paths.checkpoint_file(e) for e in final_checkpoints(load_checkpoint_list(paths))]
        out = example_predictions(self._model, files, _as_dataset(rows, self._template),
                                  family.collate(cfg), family.task(cfg))
        return [(int(c), float(p)) for c, p in zip(out["predicted"], out["p_predicted"])]

    def pin_inputs(self) -> None:
        """Pin the checkpoints new inputs are featurized with: their recorded sha256 (checked once
        now against the files) and their size and mtime (checked before every featurization)."""
        from pipelines.layout import checkpoint_digest, load_checkpoint_list

        self.pins = []
        for entry in load_checkpoint_list(self.run.paths):
            path = self.run.paths.checkpoint_file(entry)
            pin = (path, _stamp(path), entry.get("sha256"))
            if pin[2] is not None and checkpoint_digest(path) != pin[2]:
                raise InputChangedError(f"checkpoint {path} changed after `tda run` featurized this run; its answers "
                                        f"would mix models: rerun `tda run CONFIG --out {self.run.paths.root} "
                                        "--overwrite` (or put the original file back), then start tda serve again")
            self.pins.append(pin)

    def check_pins(self) -> None:
        """:class:`InputChangedError` (HTTP 503) once a pinned checkpoint changed since the server started."""
        from pipelines.layout import checkpoint_digest

        if getattr(self, "pins", None) is None:
            self.pin_inputs()
        for path, stamp, digest in self.pins:
            if _stamp(path) != stamp and (digest is None or not path.exists() or checkpoint_digest(path) != digest):
                raise InputChangedError(f"checkpoint {path} changed after this server started; it no longer answers "
                                        "new inputs: rerun `tda run` on the changed checkpoints and restart tda serve")

    def _set_threads(self) -> None:
        if self.threads is not None:
            import faiss

            faiss.omp_set_num_threads(self.threads)

    def _check_new_inputs(self, what: str) -> None:
        if not getattr(self.run.scorer, "scores_new_inputs", True):
            raise QueryError(f"the {self.run.scorer.name} scorer holds scores of the run's own queries only and "
                             f"cannot score a {what} example; ask for stored query ids")

    def _featurize(self, rows: list[dict[str, Any]]) -> FeatureBlock:
        """Features of ``rows`` under every checkpoint of the run: the featurize stage's featurizer,
        collate and batching (the model is built on the first call)."""
        from tda.data.loading import iter_batches

        from pipelines.layout import load_checkpoint_list
        from pipelines.run import collate_for, datasets_for, make_featurizer

        cfg, paths = self.run.cfg, self.run.paths
        if self._featurizer is None:
            self._featurizer = make_featurizer(cfg, "query", paths)
        if self._template is None:
            self._template = datasets_for(cfg, paths)["query"]
        dataset = _as_dataset(rows, self._template)
        feats, qs, ids = [], [], None
        for m, entry in enumerate(load_checkpoint_list(paths)):
            batches = iter_batches(dataset, collate_for(cfg), cfg.featurize.batch_size)
            parts = list(self._featurizer.featurize(paths.checkpoint_file(entry), m, batches))
            ids, f, q = (np.concatenate(p) for p in zip(*parts))
            feats.append(f.astype(np.float32))
            qs.append(q.astype(np.float32))
        return FeatureBlock(ids=ids, feats=np.stack(feats), q=np.stack(qs))


def _stamp(path: Any) -> tuple | None:
    """:func:`stores.digests.stat_stamp` of a file, or of every file of a folder (a save_pretrained checkpoint)."""
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        return tuple((f.name, *stat_stamp(f.stat())) for f in files)
    except OSError:
        return None


def _label_id(label: Any, names: list[str] | None) -> int:
    """A class id from an id or a class name."""
    if names and label in names:
        return names.index(label)
    try:
        return int(label)
    except (TypeError, ValueError):
        raise DataError(f"label {label!r} is neither a class id nor one of the class names {names}") from None


def _text(row: dict[str, Any], column: str) -> str | None:
    """The text of a new input: its ``column`` (``data.text_column``) or ``text`` entry, if a string."""
    return next((row[c] for c in (column, "text") if isinstance(row.get(c), str)), None)


def _as_dataset(rows: list[dict[str, Any]], template: Any) -> Any:
    """``rows`` as a data set with the query data's columns and types (ids -1, -2, ...)."""
    import datasets

    datasets.disable_progress_bars()  # a server's log is no place for per-request bars
    columns = [c for c in template.column_names if c != "id"]
    if not rows:
        raise DataError("no rows given; pass at least one input")
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(columns):
            raise DataError(f"row {n} must be an object with the query data's columns {columns}, got "
                            f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
    full = [{"id": -1 - n, **row} for n, row in enumerate(rows)]
    try:
        return datasets.Dataset.from_list(full).cast(template.features)
    except (TypeError, ValueError, TDAError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"the rows do not match the query data's columns {dict(template.features)} ({reason})") from exc
    except Exception as exc:  # pyarrow's conversion errors
        raise DataError(f"the rows do not match the query data's columns ({type(exc).__name__}: {exc})") from exc
