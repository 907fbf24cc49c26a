"""Record a Hugging Face ``Trainer``'s checkpoints in the ``tda-checkpoints/1`` layout.

::

    from tda.integrations.hf import CheckpointCallback

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[CheckpointCallback()])   # or CheckpointCallback(model_index=seed)
    trainer.train()    # args.output_dir/tda-checkpoints.json lists every checkpoint-N folder

Per saved checkpoint the entry is ``{"file": "checkpoint-N", "step": N, "epoch": state.epoch,
"lr": ..., "model": model_index}`` (a folder: no ``sha256``). ``lr`` is the learning rate the
update of step N used: read from the optimizer in ``on_optimizer_step`` (after
``optimizer.step()``, before ``lr_scheduler.step()``); failing that, the ``learning_rate``
logged at step N (the same value), failing that the optimizer's lr at save time (the scheduler
has already stepped: the lr of step N + 1, with a warning). Entries whose folder a
``save_total_limit`` rotation deleted are dropped at the next save.

The recipe comes from ``TrainingArguments`` at ``on_train_begin`` (see :func:`recipe_from_args`).
transformers is imported on first use of :data:`CheckpointCallback`; without it that raises
:class:`tda.errors.MissingDependencyError`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tda.errors import ConfigError, MissingDependencyError
from tda.models.recording import optimizer_recipe, update_manifest

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

#: TrainingArguments.lr_scheduler_type -> recipe schedule (warmup applies to all but "constant")
_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _name(value: Any) -> str:
    """An enum's value or the string itself (``OptimizerNames.SGD`` -> ``"sgd"``)."""
    return str(getattr(value, "value", value))


def _schedule(args: Any, max_steps: int) -> dict[str, Any]:
    """``schedule`` and ``warmup_steps`` from ``args`` (none for other schedules or custom kwargs)."""
    kind = _name(args.lr_scheduler_type)
    if kind not in _SCHEDULES or getattr(args, "lr_scheduler_kwargs", None):
        return {}
    if kind == "constant":  # HF's constant schedule ignores warmup
        return {"schedule": "constant", "warmup_steps": 0}
    if max_steps > 0:
        warmup = args.get_warmup_steps(max_steps)
    elif args.warmup_steps >= 1 or args.warmup_steps == 0:
        warmup = int(args.warmup_steps)
    else:  # a warmup ratio without the total step count
        return {"schedule": _SCHEDULES[kind]}
    return {"schedule": _SCHEDULES[kind], "warmup_steps": int(warmup)}


def recipe_from_args(args: "transformers.TrainingArguments", max_steps: int = 0, optimizer: Any = None) -> dict:
    """The recipe of a Trainer run: only the keys ``args`` determine.

    - ``optimizer``: ``adamw_torch*`` -> ``adamw``, ``sgd`` -> ``sgd`` (its ``momentum`` from
      ``optimizer``'s defaults when given); other optimizers: no ``optimizer`` key.
    - ``lr`` = ``learning_rate``; ``weight_decay`` (HF applies it to all but biases and norm weights).
    - ``schedule``/``warmup_steps`` from ``lr_scheduler_type`` ``linear``, ``cosine``, ``constant``
      (warmup 0) or ``constant_with_warmup`` (``constant`` + warmup); the ratio form of
      ``warmup_steps`` needs ``max_steps``.
    - ``epochs`` = ``num_train_epochs``, omitted when ``args.max_steps > 0`` (steps decide).
    - ``batch_size``: examples per optimizer step = ``per_device_train_batch_size`` x devices x
      ``gradient_accumulation_steps`` (``per_device_train_batch_size`` on one device).
    - ``seed``.

    Args:
        args: the Trainer's arguments.
        max_steps: the run's total optimizer steps (``state.max_steps``); 0 when unknown.
        optimizer: the Trainer's optimizer, read for SGD's momentum.
    """
    optim = _name(args.optim)
    recipe: dict[str, Any] = {"lr": float(args.learning_rate), "weight_decay": float(args.weight_decay),
                              "seed": int(args.seed), **_schedule(args, max_steps)}
    if optim.startswith("adamw_torch"):
        recipe["optimizer"] = "adamw"
    elif optim == "sgd":
        read = optimizer_recipe(optimizer) if optimizer is not None else {}
        if read.get("optimizer") == "sgd":
            recipe.update(optimizer="sgd", momentum=read["momentum"])
        elif optimizer is None and not getattr(args, "optim_args", None):
            recipe.update(optimizer="sgd", momentum=0.0)  # torch.optim.SGD's default, HF passes no momentum
    if args.max_steps is None or args.max_steps <= 0:
        epochs = float(args.num_train_epochs)
        recipe["epochs"] = int(epochs) if epochs.is_integer() else epochs
    devices = max(1, getattr(args, "n_gpu", 1) or 1) * max(1, getattr(args, "world_size", 1) or 1)
    recipe["batch_size"] = int(args.per_device_train_batch_size) * devices * int(args.gradient_accumulation_steps)
    return recipe


class _Recorder:
    """The callback's behaviour, free of transformers (mixed into ``TrainerCallback``).

    Args:
        folder: where ``tda-checkpoints.json`` goes; default ``args.output_dir``. Checkpoint
            folders are recorded relative to it (e.g. ``seed1/checkpoint-500`` when several runs
            with their own ``output_dir`` under ``folder`` record into one manifest).
        model_index: this run's index (seed) among the runs recorded into the folder.
    """

    def __init__(self, folder: str | os.PathLike | None = None, model_index: int = 0) -> None:
        if isinstance(model_index, bool) or not isinstance(model_index, int) or model_index < 0:
            raise ConfigError(f"model_index must be an int >= 0 (the run / seed index), got {model_index!r}")
        self.folder = None if folder is None else Path(folder)
        self.model_index = model_index
        self._lr: float | None = None
        self._lr_step = -1

    def _root(self, args: Any) -> Path:
        return self.folder if self.folder is not None else Path(args.output_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the recipe from ``args`` (main process only)."""
        self._lr, self._lr_step = None, -1
        if state.is_world_process_zero:
            recipe = recipe_from_args(args, int(state.max_steps or 0), kwargs.get("optimizer"))
            update_manifest(self._root(args), recipe=recipe, model_index=self.model_index)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep the lr this update used (the scheduler steps after this event)."""
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            self._lr, self._lr_step = float(optimizer.param_groups[0]["lr"]), state.global_step + 1

    def _step_lr(self, state: Any, optimizer: Any) -> float | None:
        """The lr of update ``state.global_step`` (see the module docstring for the order)."""
        if self._lr is not None and self._lr_step == state.global_step:
            return self._lr
        for log in reversed(state.log_history):
            if log.get("step") == state.global_step and "learning_rate" in log:
                return float(log["learning_rate"])
        if optimizer is not None:
            logger.warning("no lr seen for step %d; recording the optimizer's lr at save time, which the scheduler "
                           "has already moved to step %d", state.global_step, state.global_step + 1)
            return float(optimizer.param_groups[0]["lr"])
        return None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record ``output_dir/checkpoint-{global_step}`` with its step, epoch and lr."""
        if not state.is_world_process_zero:
            return
        root, checkpoint = self._root(args), Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            logger.warning("Trainer saved no folder %s (hyperparameter search runs are not recorded); "
                           "not recorded in %s", checkpoint, root)
            return
        try:
            file = Path(os.path.relpath(checkpoint.resolve(), root.resolve())).as_posix()
        except ValueError:  # another drive (Windows)
            file = ".."
        if file == ".." or file.startswith("../"):
            raise ConfigError(f"checkpoint {checkpoint} is outside the manifest folder {root}; pass "
                              "CheckpointCallback(folder=) a folder that holds args.output_dir")
        lr = self._step_lr(state, kwargs.get("optimizer"))
        if lr is None:
            raise ConfigError(f"no learning rate known for {checkpoint}: set logging_steps to divide save_steps, "
                              "or pass the optimizer to the Trainer")
        entry = {"file": file, "step": int(state.global_step), "lr": lr, "model": self.model_index}
        if state.epoch is not None:
            entry["epoch"] = float(state.epoch)
        update_manifest(root, entry=entry, model_index=self.model_index, prune_missing=True)


_CLASS: type | None = None


def _callback_class() -> type:
    """``CheckpointCallback``: :class:`_Recorder` mixed into ``transformers.TrainerCallback``."""
    global _CLASS
    if _CLASS is None:
        try:
            import transformers
        except ImportError as exc:
            raise MissingDependencyError("tda.integrations.hf.CheckpointCallback needs transformers: "
                                         "pip install 'transformers>=4.46' accelerate") from exc
        _CLASS = type("CheckpointCallback", (_Recorder, transformers.TrainerCallback),
                      {"__doc__": _Recorder.__doc__, "__module__": __name__})
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "CheckpointCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    class CheckpointCallback(_Recorder, transformers.TrainerCallback):
        """Records a Trainer's checkpoints (see :class:`_Recorder`)."""


__all__ = ["CheckpointCallback", "recipe_from_args"]
