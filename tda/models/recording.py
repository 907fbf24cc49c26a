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

import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tda.models.checkpoint_manifest import (FORMAT, MANIFEST_NAME, OPTIMIZERS, RECIPE_KEYS, SCHEDULES, replace_atomic,  # noqa: F401
                                  file_sha256, recipe_value, check_recipe, read_manifest, update_manifest)
from tda.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

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
                entry[key] = None if value is None else recipe_value(kind, value, None)
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
        replace_atomic(target, lambda temp: Path(temp).write_bytes(buffer.getvalue()))
        entry["sha256"] = file_sha256(target)
        update_manifest(self.folder, entry=entry, model_index=self.model_index)
        return target


__all__ = ["CheckpointRecorder", "FORMAT", "MANIFEST_NAME", "OPTIMIZERS", "RECIPE_KEYS", "SCHEDULES",
           "check_recipe", "optimizer_recipe", "read_manifest", "update_manifest"]
