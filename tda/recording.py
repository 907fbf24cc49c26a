"""Record checkpoints while training, in the layout the pipeline reads (``tda-checkpoints/1``).

A checkpoint folder holds the checkpoint files and ``tda-checkpoints.json``::

    {"format": "tda-checkpoints/1",
     "recipe": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "schedule": "epoch-linear",
                "warmup_steps": 0, "epochs": 3, "batch_size": 64, "seed": 0},
     "checkpoints": [{"file": "ckpt-00-000100.pt", "step": 100, "epoch": 1.0, "lr": 0.1, "model": 0, "sha256": "..."}]}

``file`` is relative to the folder (``/``-separated, no ``..``): a ``torch.save(state_dict)``
``.pt`` file with its ``sha256``, or a Trainer ``checkpoint-N`` folder (no ``sha256``). ``lr`` is
the learning rate the last update before the checkpoint used (``param_groups[0]["lr"]`` before
the scheduler stepped past it). ``step`` and ``epoch`` appear when known; ``model`` is the run /
seed index (several runs record into one folder; re-recording a file replaces its entry). The
``recipe`` holds only keys the recorder knows; ``schedule``: ``constant``, ``linear`` (HF's: to 0
over the steps after ``warmup_steps``), ``cosine`` (HF's) or ``epoch-linear`` (``lr * (1 - epoch /
epochs)`` for each epoch). The manifest is rewritten atomically (temporary file, ``os.replace``)
under ``.tda-checkpoints.lock`` (POSIX ``flock``). torch is imported only when saving.

Example (``watch`` is optional: it counts steps and keeps each step's lr)::

    rec = CheckpointRecorder("ckpts", CheckpointRecorder.recipe_from(opt, epochs=3, batch_size=64, seed=0,
                                                                     schedule="epoch-linear")).watch(opt)
    for epoch in range(3):
        for batch in loader: ...; opt.step()
        rec.save(model, epoch=epoch + 1)   # without watch(): rec.save(model, opt, ...) before scheduler.step()
        scheduler.step()
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .errors import CheckpointError, ConfigError, DataError, TDAError, reading

if TYPE_CHECKING:
    import torch

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


def _value(kind: str, value: Any, allowed: tuple[str, ...] | None) -> Any:
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
            out[key] = _value(kind, value, allowed)
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
                entry[key] = _value(kind, entry[key], None)
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
    if "sha256" in entry and _sha256(target) != entry["sha256"]:
        raise CheckpointError(f"{target} does not match its sha256 in {folder / MANIFEST_NAME} (changed after "
                              "recording); restore the original file or record it again")


def _sha256(path: Path) -> str:
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


def _replace_atomic(path: Path, write: Any) -> None:
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
        _replace_atomic(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return manifest


def optimizer_recipe(optimizer: "torch.optim.Optimizer") -> dict:
    """``optimizer``, ``lr``, ``momentum`` (SGD only), ``weight_decay`` from a torch optimizer's
    defaults (the constructor's arguments; per-group overrides are not seen). An optimizer the
    recipe cannot name (another class, Nesterov or dampened SGD, AMSGrad) gives no ``optimizer``
    and ``momentum`` keys, with a logged warning; a wrapper with ``.optimizer`` is unwrapped."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    defaults = dict(getattr(inner, "defaults", {}))
    out: dict[str, Any] = {k: float(defaults[k]) for k in ("lr", "weight_decay") if k in defaults}
    name = None
    if isinstance(inner, torch.optim.SGD) and not defaults.get("nesterov") and not defaults.get("dampening"):
        name = "sgd"
        out["momentum"] = float(defaults.get("momentum", 0.0))
    elif isinstance(inner, torch.optim.Adam) and not defaults.get("amsgrad"):  # AdamW subclasses Adam
        decoupled = isinstance(inner, torch.optim.AdamW) or defaults.get("decoupled_weight_decay")
        name = "adamw" if decoupled else "adam"
    if name is None:
        logger.warning("the recipe cannot name optimizer %s (%s); recording it without 'optimizer'",
                       type(inner).__name__, {k: v for k, v in defaults.items() if k != "params"})
    else:
        out["optimizer"] = name
    return out


class CheckpointRecorder:
    """Save plain-PyTorch checkpoints into ``folder`` and list them in ``tda-checkpoints.json``.

    Args:
        folder: the checkpoint folder (created when missing; may hold other runs' checkpoints).
        recipe: the training recipe (keys of :data:`RECIPE_KEYS`; see :meth:`recipe_from`),
            written at once so a clash with the folder's recipe fails before training.
        model_index: this run's index (seed) among the runs recorded into ``folder``.

    Raises:
        ConfigError: a recipe value or ``model_index`` is invalid.
        CheckpointError: the folder's manifest is foreign or records another recipe.
    """

    def __init__(self, folder: str | os.PathLike, recipe: Mapping[str, Any] | None = None,
                 model_index: int = 0) -> None:
        if isinstance(model_index, bool) or not isinstance(model_index, int) or model_index < 0:
            raise ConfigError(f"model_index must be an int >= 0 (the run / seed index), got {model_index!r}")
        self.folder, self.model_index = Path(folder), model_index
        self._watched: Any = None
        self._steps, self._step_lr = 0, None
        self.folder.mkdir(parents=True, exist_ok=True)
        update_manifest(self.folder, recipe=None if recipe is None else dict(recipe), model_index=model_index)

    @staticmethod
    def recipe_from(optimizer: "torch.optim.Optimizer", *, epochs: float | None = None,
                    batch_size: int | None = None, seed: int | None = None, schedule: str | None = None,
                    warmup_steps: int | None = None) -> dict:
        """A recipe from ``optimizer``'s defaults (:func:`optimizer_recipe`) plus the given keys;
        keys left ``None`` are omitted (never guessed).

        Raises:
            ConfigError: a value is out of range or ``schedule`` is not one of :data:`SCHEDULES`.
        """
        given = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "schedule": schedule,
                 "warmup_steps": warmup_steps}
        return check_recipe({**optimizer_recipe(optimizer), **{k: v for k, v in given.items() if v is not None}})

    def watch(self, optimizer: "torch.optim.Optimizer", start_step: int = 0) -> "CheckpointRecorder":
        """Count ``optimizer``'s steps and keep the lr each step used (a step post-hook), so
        :meth:`save` knows ``step`` and the lr of the last step wherever ``scheduler.step()`` is.

        Args:
            optimizer: the training optimizer.
            start_step: steps already taken (when resuming).
        """
        def hook(opt: Any, args: Any, kwargs: Any) -> None:
            self._steps += 1
            self._step_lr = float(opt.param_groups[0]["lr"])

        optimizer.register_step_post_hook(hook)
        self._watched, self._steps, self._step_lr = optimizer, int(start_step), None
        return self

    def _lr(self, optimizer: Any, lr: float | None) -> float:
        if lr is not None:
            return float(lr)
        if self._step_lr is not None and optimizer in (None, self._watched):
            return self._step_lr
        if optimizer is not None:
            return float(optimizer.param_groups[0]["lr"])
        raise ConfigError("CheckpointRecorder.save needs the learning rate: pass lr=, optimizer= "
                          "(its param_groups[0]['lr'] is read) or call watch(optimizer) before training")

    def _file_name(self, step: int | None, epoch: float | None) -> str:
        if step is not None:
            return f"ckpt-{self.model_index:02d}-{step:06d}.pt"
        if epoch is not None and float(epoch).is_integer():
            return f"ckpt-{self.model_index:02d}-epoch{int(epoch):03d}.pt"
        raise ConfigError(f"CheckpointRecorder.save needs step= or a whole epoch= to name the file (got step={step!r}, "
                          f"epoch={epoch!r}); pass step= (optimizer steps taken) or call watch(optimizer)")

    def save(self, model_or_state_dict: "torch.nn.Module | Mapping[str, Any]", optimizer: Any = None,
             step: int | None = None, epoch: float | None = None, lr: float | None = None) -> Path:
        """Save the weights as ``ckpt-{model:02d}-{step:06d}.pt`` (or ``-epoch{epoch:03d}.pt``
        without a step) and record it.

        Args:
            model_or_state_dict: the model, or its state dict (tensors are saved on the CPU).
            optimizer: read for the lr (``param_groups[0]["lr"]`` now: call before ``scheduler.step()``).
            step: optimizer steps taken; default: the count of a watched optimizer.
            epoch: epochs completed (may be fractional).
            lr: the lr of the last step; default: the watched optimizer's, else ``optimizer``'s.

        Returns:
            The path of the written ``.pt`` file.

        Raises:
            ConfigError: no lr source, or neither a step nor a whole epoch.
            DataError: ``model_or_state_dict`` is neither a module nor a mapping.
        """
        import torch

        if step is None and self._watched is not None and optimizer in (None, self._watched):
            step = self._steps
        given = {"step": ("int", step), "epoch": ("number", epoch), "lr": ("number", self._lr(optimizer, lr))}
        entry: dict[str, Any] = {"model": self.model_index}
        for key, (kind, value) in given.items():
            try:
                entry[key] = None if value is None else _value(kind, value, None)
            except ValueError as exc:
                raise ConfigError(f"CheckpointRecorder.save {key}={value!r}: {exc}; pass an int step >= 0, "
                                  "an epoch >= 0 and a finite lr >= 0") from None
        name = self._file_name(entry["step"], entry["epoch"])
        entry = {"file": name, **{k: v for k, v in entry.items() if v is not None}}
        if isinstance(model_or_state_dict, torch.nn.Module):
            state = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            state = dict(model_or_state_dict)
        else:
            raise DataError(f"CheckpointRecorder.save takes an nn.Module or its state_dict, "
                            f"got {type(model_or_state_dict).__name__}")
        state = {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        buffer = io.BytesIO()  # through memory: the archive does not name the temporary file, so
        torch.save(state, buffer)  # identical weights give identical bytes (and sha256)
        target = self.folder / entry["file"]
        _replace_atomic(target, lambda temp: Path(temp).write_bytes(buffer.getvalue()))
        entry["sha256"] = _sha256(target)
        update_manifest(self.folder, entry=entry, model_index=self.model_index)
        return target


__all__ = ["CheckpointRecorder", "FORMAT", "MANIFEST_NAME", "OPTIMIZERS", "RECIPE_KEYS", "SCHEDULES",
           "check_recipe", "optimizer_recipe", "read_manifest", "update_manifest"]
