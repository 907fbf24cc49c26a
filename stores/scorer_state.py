"""A run's fitted scorer state: ``scorer/state.npz`` (the arrays of ``Scorer.state_dict()``) and its
marker ``scorer/scorer.json`` (scorer name, fingerprint, hyperparameters, the state's sha256).

The marker is written last, so a fit killed half-way leaves no marker and reads as not fitted.
:func:`load` is the one reader: the index stage, the full ``tda query`` path, ``tda serve`` and
the torch-free path (:mod:`pipelines.query.lean`) all check the fingerprint and the sha256 here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tda.errors import IndexMismatchError, StoreCorruptError, StoreError

from stores._io import json_field, save_json, save_npz, sha256_file

STATE_FILE, MARKER_FILE = "state.npz", "scorer.json"


def state_path(folder: Path) -> Path:
    """``state.npz`` in the run's ``scorer/`` folder."""
    return Path(folder) / STATE_FILE


def marker_path(folder: Path) -> Path:
    """``scorer.json`` in the run's ``scorer/`` folder."""
    return Path(folder) / MARKER_FILE


def marker_field(folder: Path, key: str) -> Any:
    """``key`` of the marker, or None when it is missing or unreadable."""
    return json_field(marker_path(folder), key)


def exists(folder: Path) -> bool:
    """Whether a state file is there (fitted for any configuration, intact or not)."""
    return state_path(folder).is_file()


def save(folder: Path, state: dict[str, np.ndarray], *, scorer: str, fingerprint: str,
         hyperparameters: dict[str, Any]) -> None:
    """Write the state, then its marker with the state's sha256 (both atomically)."""
    save_npz(state_path(folder), **state)
    save_json(marker_path(folder), {"scorer": scorer, "fingerprint": fingerprint, "hyperparameters": hyperparameters,
                                    "sha256": sha256_file(state_path(folder))})


def fitted_for(folder: Path, fingerprint: str) -> bool:
    """Whether the marker records ``fingerprint`` (no marker: a fit that never finished)."""
    return marker_field(folder, "fingerprint") == fingerprint


def intact(folder: Path) -> bool:
    """The state matches the sha256 its marker recorded (markers without one: yes)."""
    want = marker_field(folder, "sha256")
    return exists(folder) and (want is None or sha256_file(state_path(folder)) == want)


def load(folder: Path, fingerprint: str) -> dict[str, np.ndarray]:
    """The saved state arrays (no pickle), checked: :class:`StoreError` when missing,
    :class:`IndexMismatchError` when fitted for another ``fingerprint`` (the scorer fingerprint
    of the configuration asking), :class:`StoreCorruptError` when the sha256 does not match."""
    folder = Path(folder)
    path = state_path(folder)
    if not path.is_file():
        raise StoreError(f"{path} is missing; run the index stage first (`tda run CONFIG --from index`)")
    if not fitted_for(folder, fingerprint):
        raise IndexMismatchError(
            f"the scorer in {folder} was fitted for another score/index configuration; refit it with "
            "`tda run CONFIG --from index`"
        )
    if not intact(folder):
        raise StoreCorruptError(f"{path} does not match the sha256 in scorer.json (damaged or truncated); "
                                "refit it with `tda run CONFIG --from index`")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
