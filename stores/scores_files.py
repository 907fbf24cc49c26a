"""A run's score folder (``scores/``, written by the score stage):

- ``topk.npz``: ``query_ids`` (m,), ``train_ids`` (n,), and per query the ``proponent_ids``,
  ``proponent_scores``, ``opponent_ids`` and ``opponent_scores``, each (m, k);
- ``scores.npy``: the dense (m, n) float32 scores, unless ``score.dense`` is false; filled block
  by block through ``scores.partial.npy`` and its progress record ``scores.progress.json``
  (:class:`DenseWriter`, resumable), renamed into place when complete;
- ``influential.json``: the generally influential training examples per scorer (the diffusion
  family's extra result);
- ``scores.json``, the marker, written last: the score fingerprint, ``n_query``, ``n_train``, the
  time it finished and the sha256 of ``topk.npz`` and ``scores.npy``.

Every reader goes through :func:`load_topk`, :func:`load_dense` and :func:`load_influential`;
they check what the files record (the marker's sha256 and sizes, where an older tda recorded them;
the arrays' shapes and ids) and raise :class:`~tda.errors.StoreCorruptError` naming the file and
the rerun that recomputes it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tda.errors import IndexMismatchError, StoreCorruptError, StoreError

from stores._io import json_field, reserve, save_json, save_npz, sha256_file

TOPK_FILE, SCORES_FILE, MARKER_FILE = "topk.npz", "scores.npy", "scores.json"
PARTIAL_FILE, PROGRESS_FILE, INFLUENTIAL_FILE = "scores.partial.npy", "scores.progress.json", "influential.json"
#: the arrays of ``topk.npz``; the last four are (n_query, k)
TOPK_KEYS = ("query_ids", "train_ids", "proponent_ids", "proponent_scores", "opponent_ids", "opponent_scores")
#: the fix named by a failed check (``{root}``: the run folder)
FIX = "rerun `tda run CONFIG --out {root}`: it recomputes damaged scores"
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def topk_path(folder: Path) -> Path:
    """``topk.npz`` in the run's ``scores/`` folder."""
    return Path(folder) / TOPK_FILE


def scores_path(folder: Path) -> Path:
    """``scores.npy`` (the dense matrix) in the run's ``scores/`` folder."""
    return Path(folder) / SCORES_FILE


def marker_path(folder: Path) -> Path:
    """``scores.json`` in the run's ``scores/`` folder (written last: finished scores)."""
    return Path(folder) / MARKER_FILE


def influential_path(folder: Path) -> Path:
    """``influential.json`` in the run's ``scores/`` folder."""
    return Path(folder) / INFLUENTIAL_FILE


def marker_field(folder: Path, key: str) -> Any:
    """``key`` of the marker, or None when it is missing or unreadable."""
    return json_field(marker_path(folder), key)


def exists(folder: Path) -> bool:
    """Whether finished scores are there (their marker, written last)."""
    return marker_path(folder).is_file()


def has_dense(folder: Path) -> bool:
    """Whether the dense ``scores.npy`` is there."""
    return scores_path(folder).is_file()


def outputs(folder: Path, dense: bool) -> dict[str, Path]:
    """The score stage's files: ``topk``, and ``scores`` (the dense matrix) when ``dense``."""
    files = {"topk": topk_path(folder)}
    if dense:
        files["scores"] = scores_path(folder)
    return files


def intact(folder: Path, dense: bool) -> bool:
    """Every output exists and matches the sha256 the marker recorded (none recorded: no)."""
    want, files = marker_field(folder, "sha256"), outputs(folder, dense)
    if not isinstance(want, dict) or set(want) != set(files):
        return False
    return all(p.is_file() and sha256_file(p) == want[k] for k, p in files.items())


def current(folder: Path, fingerprint: str, dense: bool) -> bool:
    """The marker records ``fingerprint`` (the score fingerprint of the configuration asking)
    and the outputs match their recorded sha256."""
    return marker_field(folder, "fingerprint") == fingerprint and intact(folder, dense)


def discard_marker(folder: Path) -> None:
    """Remove the marker: until a new one is written no score file is trusted."""
    marker_path(folder).unlink(missing_ok=True)


def discard_dense(folder: Path) -> None:
    """Remove ``scores.npy`` (of an earlier configuration: not the scores of this one)."""
    scores_path(folder).unlink(missing_ok=True)


def save_topk(folder: Path, *, query_ids: np.ndarray, train_ids: np.ndarray, proponent_ids: np.ndarray,
              proponent_scores: np.ndarray, opponent_ids: np.ndarray, opponent_scores: np.ndarray) -> Path:
    """Write ``topk.npz`` atomically."""
    save_npz(topk_path(folder), query_ids=query_ids, train_ids=train_ids, proponent_ids=proponent_ids,
             proponent_scores=proponent_scores, opponent_ids=opponent_ids, opponent_scores=opponent_scores)
    return topk_path(folder)


def save_marker(folder: Path, *, fingerprint: str, n_query: int, n_train: int, dense: bool, finished: str) -> None:
    """Write the marker (last), with the sha256 of every output."""
    save_json(marker_path(folder), {"fingerprint": fingerprint, "n_query": int(n_query), "n_train": int(n_train),
                                    "finished": finished,
                                    "sha256": {k: sha256_file(p) for k, p in outputs(folder, dense).items()}})


def _corrupt(path: Path, why: str, root: Path) -> StoreCorruptError:
    return StoreCorruptError(f"{path} cannot be read ({why}); {FIX.format(root=root)}")


def load_topk(folder: Path, fingerprint: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``topk.npz``, checked: :class:`StoreError` when no finished scores are there,
    :class:`IndexMismatchError` when made for another ``fingerprint`` (given: the score fingerprint of
    the configuration asking), :class:`StoreCorruptError` when unreadable, not matching the sha256 or
    sizes the marker recorded, or of inconsistent shapes."""
    folder = Path(folder)
    path, root = topk_path(folder), folder.parent
    _check_marker(folder, fingerprint)
    try:
        with np.load(path, allow_pickle=False) as z:
            top = {key: z[key] for key in z.files}
    except _UNREADABLE as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}", root) from exc
    want = marker_field(folder, "sha256")
    if isinstance(want, dict) and "topk" in want and sha256_file(path) != want["topk"]:
        raise _corrupt(path, f"it does not match the sha256 in {MARKER_FILE}: damaged, or another run's", root)
    missing = [key for key in TOPK_KEYS if key not in top]
    if missing:
        raise _corrupt(path, f"it lacks {missing}: not a tda top-k file", root)
    m, n = len(top["query_ids"]), len(top["train_ids"])
    shapes = {top[key].shape for key in TOPK_KEYS[2:]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != m:
        raise _corrupt(path, f"its proponent/opponent arrays are not all ({m}, k): {sorted(shapes)}", root)
    recorded = (marker_field(folder, "n_query"), marker_field(folder, "n_train"))
    if None not in recorded and recorded != (m, n):
        raise _corrupt(path, f"it holds {m} queries x {n} training examples, {MARKER_FILE} records "
                             f"{recorded[0]} x {recorded[1]}", root)
    return top


def _check_marker(folder: Path, fingerprint: str | None) -> None:
    if not exists(folder):
        raise StoreError(f"{folder} holds no finished scores ({MARKER_FILE} is missing); run the score stage "
                         "(`tda run CONFIG`)")
    recorded = marker_field(folder, "fingerprint")
    if fingerprint is not None and recorded != fingerprint:
        raise IndexMismatchError(f"the scores in {folder} were made for another score configuration "
                                 f"({recorded!r}, this one is {fingerprint!r}); rescore with `tda run CONFIG --from "
                                 "score`")


def load_dense(folder: Path, fingerprint: str | None = None, mmap: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """``(scores (m, n), query ids (m,), train ids (n,))``: ``scores.npy`` with the ids of
    ``topk.npz`` (checked as :func:`load_topk` checks), the matrix checked against their
    numbers; ``mmap``: memory-mapped, read only. :class:`StoreError` when ``scores.npy`` is
    missing (a run with ``score.dense: false``)."""
    folder = Path(folder)
    path = scores_path(folder)
    top = load_topk(folder, fingerprint)
    if not path.is_file():
        raise StoreError(f"{path} is missing: the run was scored with score.dense: false; rescore with `tda run "
                         "CONFIG --from score --set score.dense=true`")
    try:
        scores = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except _UNREADABLE as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}", folder.parent) from exc
    want = (len(top["query_ids"]), len(top["train_ids"]))
    if scores.shape != want:
        raise _corrupt(path, f"its shape is {scores.shape}, {TOPK_FILE} holds {want[0]} queries x {want[1]} "
                             "training examples", folder.parent)
    return scores, top["query_ids"], top["train_ids"]


def save_influential(folder: Path, counts: dict[str, dict[str, Any]]) -> None:
    """Write ``influential.json``: per scorer ``proponents`` and ``opponents`` (id lists), ``k`` and
    ``fraction``."""
    save_json(influential_path(folder), {name: {**{s: np.asarray(c[s]).tolist() for s in ("proponents", "opponents")},
                                                "k": c["k"], "fraction": c["fraction"]}
                                         for name, c in counts.items()})


def load_influential(folder: Path) -> dict[str, dict[str, Any]]:
    """``influential.json`` with the id lists as int64 arrays; :class:`StoreCorruptError` when
    missing or damaged."""
    path = influential_path(Path(folder))
    try:
        saved = json.loads(path.read_text())
        return {name: {**c, **{s: np.asarray(c[s], dtype=np.int64) for s in ("proponents", "opponents")}}
                for name, c in saved.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}", Path(folder).parent) from exc


class DenseWriter:
    """``scores.npy`` filled column block by column block through ``scores.partial.npy`` (a memmap),
    its progress recorded after each block in ``scores.progress.json`` under ``key`` (what the
    scores depend on: a pass of another key starts over); an interrupted pass resumes at
    :attr:`done`, the first column not recorded."""

    def __init__(self, folder: Path, shape: tuple[int, int], key: dict[str, Any]) -> None:
        self.folder, self.shape = Path(folder), (int(shape[0]), int(shape[1]))
        self.key = {**key, "shape": list(self.shape)}
        self.partial, self.progress = self.folder / PARTIAL_FILE, self.folder / PROGRESS_FILE
        self.done = self._resumable()
        if self.done == 0:
            self.progress.unlink(missing_ok=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=self.shape).flush()
            reserve(self.partial, self.partial.stat().st_size)  # a full disk is an error now, not a SIGBUS mid-way
        self._out: Any = np.lib.format.open_memmap(self.partial, mode="r+")

    def _resumable(self) -> int:
        """Columns a killed pass of the same key finished (0: none, or its files do not match)."""
        try:
            prog = json.loads(self.progress.read_text())
            if {k: prog.get(k) for k in self.key} == self.key and self.partial.is_file():
                out = np.lib.format.open_memmap(self.partial, mode="r+")
                return int(prog["cols"]) if out.shape == self.shape and out.dtype == np.float32 else 0
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return 0

    def write(self, col: int, block: np.ndarray) -> int:
        """Write the (n_query, b) ``block`` at column ``col`` and record it; the next column."""
        end = col + block.shape[1]
        self._out[:, col:end] = block
        self._out.flush()
        save_json(self.progress, {**self.key, "cols": end})
        return end

    def finish(self, cols: int) -> Path:
        """Rename the complete matrix into place (``cols``: the columns written)."""
        del self._out
        if cols != self.shape[1]:
            raise StoreError(f"scored {cols} of {self.shape[1]} training examples; delete {self.folder} and rerun")
        with open(self.partial, "rb+") as fh:
            os.fsync(fh.fileno())
        final = scores_path(self.folder)
        os.replace(self.partial, final)
        self.progress.unlink(missing_ok=True)
        return final
