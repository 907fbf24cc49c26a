"""The checkpoint manifest ``tda-checkpoints.json`` (format ``tda-checkpoints/1``): its checks,
reading and atomic, locked updates. :mod:`tda.models.recording` writes it while training runs; the
pipeline reads it (``model.checkpoints`` naming a recorder's folder). The format is described in
:mod:`tda.models.recording`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from tda.errors import CheckpointError, ConfigError, TDAError, reading

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tda-checkpoints.json"
FORMAT = "tda-checkpoints/1"
LOCK_NAME = ".tda-checkpoints.lock"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine", "epoch-linear")
#: recipe key -> (kind, allowed values or None); kinds: "name", "number" (finite >= 0), "int" (>= 0)
RECIPE_KEYS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "optimizer": ("name", OPTIMIZERS), "lr": ("number", None), "momentum": ("number", None),
    "weight_decay": ("number", None), "schedule": ("name", SCHEDULES), "warmup_steps": ("int", None),
    "epochs": ("number", None), "batch_size": ("int", None), "seed": ("int", None),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def recipe_value(kind: str, value: Any, allowed: tuple[str, ...] | None) -> Any:
    """``value`` normalised for ``kind``; raises ``TypeError``/``ValueError`` with the reason."""
    if kind == "name":
        if value not in (allowed or ()):
            raise ValueError(f"{value!r} is not one of {', '.join(allowed or ())}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r} is not a finite number >= 0")
    if kind == "int":
        if value != int(value):
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    return int(value) if isinstance(value, int) else float(value)


def check_recipe(recipe: Mapping[str, Any], error: type[TDAError] = ConfigError, where: str = "recipe") -> dict:
    """The recipe with its values checked and normalised (an int ``lr`` becomes a float).

    Args:
        recipe: the recipe keys (:data:`RECIPE_KEYS`); any subset.
        error: the error class to raise.
        where: what to call the recipe in the message.

    Raises:
        TDAError: ``error`` naming the key, the value and the allowed values.
    """
    if not isinstance(recipe, Mapping):
        raise error(f"{where} must be a dict of {', '.join(RECIPE_KEYS)}, got {type(recipe).__name__}")
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if key not in RECIPE_KEYS:
            raise error(f"{where} has an unknown key {key!r}; use only {', '.join(RECIPE_KEYS)}")
        kind, allowed = RECIPE_KEYS[key]
        try:
            out[key] = recipe_value(kind, value, allowed)
        except ValueError as exc:
            raise error(f"{where} key {key!r}: {exc}; fix the value or leave the key out") from None
    for key in ("lr", "momentum", "weight_decay"):
        if key in out:
            out[key] = float(out[key])
    return out


def _check_entry(entry: Any, where: str) -> dict:
    """One ``checkpoints`` entry checked and normalised (a copy); raises ``ValueError`` saying what
    is wrong. Keys other than the format's are kept."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object")
    entry = dict(entry)
    file = entry.get("file")
    if not isinstance(file, str) or not file or PurePosixPath(file).is_absolute() or ".." in file.split("/"):
        raise ValueError(f"{where} 'file' must be a path relative to the folder, got {file!r}")
    for key, kind, required in (("model", "int", True), ("lr", "number", True),
                                ("step", "int", False), ("epoch", "number", False)):
        if key in entry or required:
            if key not in entry:
                raise ValueError(f"{where} ({file}) has no {key!r}")
            try:
                entry[key] = recipe_value(kind, entry[key], None)
            except ValueError as exc:
                raise ValueError(f"{where} ({file}) {key!r}: {exc}") from None
    entry["lr"] = float(entry["lr"])
    if "epoch" in entry:
        entry["epoch"] = float(entry["epoch"])
    if "sha256" in entry and not (isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
        raise ValueError(f"{where} ({file}) 'sha256' is not 64 lowercase hex digits")
    return entry


def _parse(path: Path, text: str) -> dict:
    """The manifest at ``path`` (its ``text``) checked; raises ``ValueError`` with the reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"its format is {found!r}, not {FORMAT!r}")
    recipe = check_recipe(data.get("recipe", {}), CheckpointError, f"{path} recipe")
    entries = data.get("checkpoints")
    if not isinstance(entries, list):
        raise ValueError("'checkpoints' is not a list")
    checked = [_check_entry(entry, f"checkpoints[{i}]") for i, entry in enumerate(entries)]
    files = [entry["file"] for entry in checked]
    if len(set(files)) != len(files):
        raise ValueError("a file is listed twice")
    return {"format": FORMAT, "recipe": recipe, "checkpoints": checked}


def read_manifest(folder: str | os.PathLike, verify: bool = False) -> dict | None:
    """The checkpoint manifest of ``folder``, or ``None`` when it has no ``tda-checkpoints.json``.

    Args:
        folder: the checkpoint folder.
        verify: also check that every listed file exists and that ``.pt`` files match their sha256.

    Returns:
        ``{"format", "recipe", "checkpoints"}`` with the entries in the file's order.

    Raises:
        CheckpointError: the file is not a ``tda-checkpoints/1`` manifest (foreign, truncated,
            corrupt) or, with ``verify``, a checkpoint is missing or changed; the message names
            the file and the fix.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    fix = (f"it is not a {FORMAT} manifest written by tda.CheckpointRecorder; delete it and record again, "
           "or record into another folder")
    with reading(path, "checkpoint manifest", fix, CheckpointError):
        text = path.read_text(encoding="utf-8")
    try:
        manifest = _parse(path, text)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TDAError):
            raise
        raise CheckpointError(f"checkpoint manifest {path} cannot be used ({exc}); {fix}") from None
    if verify:
        for entry in manifest["checkpoints"]:
            _verify(Path(folder), entry)
    return manifest


def _verify(folder: Path, entry: dict) -> None:
    """Raise :class:`CheckpointError` when ``entry``'s file is missing or its sha256 differs."""
    target = folder / entry["file"]
    if not target.exists():
        raise CheckpointError(f"{folder / MANIFEST_NAME} lists {entry['file']}, which does not exist; restore it, "
                              "or record the run again (a Trainer's save_total_limit deletes old checkpoints)")
    if "sha256" in entry and file_sha256(target) != entry["sha256"]:
        raise CheckpointError(f"{target} does not match its sha256 in {folder / MANIFEST_NAME} (changed after "
                              "recording); restore the original file or record it again")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s manifest (POSIX ``flock``; no lock elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_atomic(path: Path, write: Any) -> None:
    """Write ``path`` by calling ``write(temp_path)`` and renaming the temporary file over it."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _merge_recipe(stored: dict, new: dict, model_index: int, path: Path) -> dict:
    """``stored`` updated with ``new``; keys other than ``seed`` must agree. The seed kept is the
    one of run ``model 0`` once it has recorded (else the first recorded)."""
    clash = sorted(k for k in new if k in stored and k != "seed" and stored[k] != new[k])
    if clash:
        diffs = ", ".join(f"{k}: {stored[k]!r} recorded, {new[k]!r} now" for k in clash)
        raise CheckpointError(f"{path} records another training recipe ({diffs}); record this run into another "
                              "folder, or delete the folder's checkpoints and manifest to start over")
    merged = {**stored, **{k: v for k, v in new.items() if k != "seed"}}
    if "seed" in new and (model_index == 0 or "seed" not in stored):
        merged["seed"] = new["seed"]
    return merged


def _sort_key(entry: dict) -> tuple:
    return (entry["model"], entry.get("step", -1), entry.get("epoch", -1.0), entry["file"])


def update_manifest(folder: str | os.PathLike, recipe: Mapping[str, Any] | None = None,
                    entry: Mapping[str, Any] | None = None, model_index: int = 0,
                    prune_missing: bool = False) -> dict:
    """Add a recipe and/or a checkpoint entry to ``folder``'s manifest (both created when absent)
    and return the manifest written.

    Args:
        folder: the checkpoint folder.
        recipe: recipe keys to record (merged, see :func:`_merge_recipe`).
        entry: a ``checkpoints`` entry; one with the same ``file`` is replaced.
        model_index: the run recording (decides whose ``seed`` the recipe keeps).
        prune_missing: drop this run's entries whose file no longer exists (rotated checkpoints).

    Raises:
        CheckpointError: the manifest is foreign or corrupt, or records another recipe.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_NAME
    with _locked(root):
        manifest = read_manifest(root) or {"format": FORMAT, "recipe": {}, "checkpoints": []}
        if recipe is not None:
            manifest["recipe"] = _merge_recipe(manifest["recipe"], check_recipe(recipe), model_index, path)
        entries = manifest["checkpoints"]
        if prune_missing:
            entries = [e for e in entries if e["model"] != model_index or (root / e["file"]).exists()]
        if entry is not None:
            try:
                new = _check_entry(dict(entry), "the new checkpoint entry")
            except ValueError as exc:
                raise ConfigError(f"{exc}; give file, model, lr and optional step, epoch, sha256") from None
            entries = [e for e in entries if e["file"] != new["file"]] + [new]
        manifest["checkpoints"] = sorted(entries, key=_sort_key)
        text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
        replace_atomic(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return manifest


__all__ = ["FORMAT", "LOCK_NAME", "MANIFEST_NAME", "OPTIMIZERS", "RECIPE_KEYS", "SCHEDULES", "check_recipe",
           "read_manifest", "update_manifest"]
