"""The result JSON of a run's workflows: ``curation/curation.json`` (``tda curate``),
``unlearning/unlearning.json`` (``tda unlearn``) and ``validation/validation.json`` (``tda
validate``), each written atomically by its stage and read by the HTML report (and the
validation's calibration by ``tda unlearn``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stores._io import save_json

#: workflow -> its result file in the run folder
FILES = {"curation": "curation/curation.json", "unlearning": "unlearning/unlearning.json",
         "validation": "validation/validation.json"}


def path(root: Path, workflow: str) -> Path:
    """The result file of ``workflow`` (a key of :data:`FILES`) in the run folder ``root``."""
    return Path(root) / FILES[workflow]


def exists(root: Path, workflow: str) -> bool:
    """Whether ``workflow`` wrote its result."""
    return path(root, workflow).is_file()


def save(root: Path, workflow: str, result: dict[str, Any]) -> None:
    """Write the result atomically (sorted keys), making its folder."""
    save_json(path(root, workflow), result)


def load(root: Path, workflow: str) -> Any:
    """The result as written (``OSError`` when missing, ``ValueError`` when not JSON)."""
    return json.loads(path(root, workflow).read_text())


def load_or_none(root: Path, workflow: str) -> dict[str, Any] | None:
    """The result, or None when it is missing, unreadable or not a JSON object."""
    try:
        record = load(root, workflow)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
