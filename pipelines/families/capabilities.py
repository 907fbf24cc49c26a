"""Capabilities that follow the task, not the family: predictions, losses and retraining.

:class:`TaskCapabilities` gives any family whose task is a classifier or a causal LM (a user's
``nn.Module``, a Hugging Face model) what the demo families have: per-example predictions and
losses (``tda curate``, the report, ``tda query``), query accuracy, and retraining on subsets with
the generic recipe (:class:`tda.workflows.recipe.TrainRecipe`: ``tda validate``, curate's and unlearn's
checks, AirRep) -- or with the user's own ``train.factory`` when it is set.

The recipe's settings come from the ``train`` section; a key left unset (``None``, or ``lr`` /
``epochs`` / ``batch_size`` at their defaults) takes the value recorded with the checkpoints by
:class:`tda.CheckpointRecorder` or :class:`tda.integrations.hf.CheckpointCallback`
(``tda-checkpoints.json`` beside them), else the recipe's default. :func:`resolve_recipe` says
where each value came from.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tda.data.loading import iter_batches
from tda.errors import ConfigError
from tda.featurizers.gradient import apply_checkpoint
from tda.featurizers.predictions import PREDICTED_KINDS, example_predictions
from tda.workflows.recipe import TrainRecipe
from tda.models.tasks import Task

from pipelines.imports import import_object
from pipelines.layout import load_checkpoint_list
from pipelines.held import config_key, held
from pipelines.families.jobs import SubsetJob
from pipelines.families.registry import family_for

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)

#: train keys with non-None defaults: a recorded value wins while they sit at these defaults
_DEFAULTED = {"lr": 0.05, "epochs": 4, "batch_size": 128}


def recorded_recipe(cfg: RunConfig) -> dict[str, Any]:
    """The recipe a recorder wrote beside the first of ``model.checkpoints`` (empty without one)."""
    from tda.models.recording import read_manifest

    if not cfg.model.checkpoints:
        return {}
    first = Path(cfg.model.checkpoints[0])
    manifest = read_manifest(first.parent) or {}
    return dict(manifest.get("recipe") or {})


def resolve_recipe(cfg: RunConfig) -> tuple[TrainRecipe, dict[str, str]]:
    """The generic recipe of the run and, per setting, its source: ``config``, ``recorded`` or ``default``."""
    recorded, t, values, sources = recorded_recipe(cfg), cfg.train, {}, {}
    for f in fields(TrainRecipe):
        mine = getattr(t, f.name, None)
        if mine is not None and not (f.name in _DEFAULTED and mine == _DEFAULTED[f.name] and f.name in recorded):
            values[f.name], sources[f.name] = mine, "config"
        elif f.name in recorded and recorded[f.name] is not None:
            values[f.name], sources[f.name] = recorded[f.name], "recorded"
        else:
            sources[f.name] = "default"
    values["seed"], sources["seed"] = t.seed, "config"
    return TrainRecipe(**values), sources


def measure_queries(model: nn.Module, task: Task, query: dict[str, torch.Tensor], measure: str) -> torch.Tensor:
    """Per query: ``"margin"`` the attributed output f; ``"correct"`` the top-1 hit (an LM: f);
    ``"both"`` f then the hits, ``(2m,)`` (an LM: f only)."""
    rows = len(next(iter(query.values())))
    outs, hits = [], []
    with torch.no_grad():
        for lo in range(0, rows, 256):
            batch = {k: v[lo: lo + 256] for k, v in query.items()}
            outs.append(task.output(model.eval(), batch).double())
            if task.kind == "classification":
                hits.append((task.logits(model, batch).argmax(1) == batch[task.label_key]).double())
    f = torch.cat(outs)
    if task.kind != "classification" or measure == "margin":
        return f
    return torch.cat(hits) if measure == "correct" else torch.cat([f, torch.cat(hits)])


class RecipeSubsetJob(SubsetJob):
    """Retrain with the generic recipe on the rows (or with data weights), measure every query."""

    supports_weights = True

    def __init__(self, cfg: RunConfig, recipe: TrainRecipe, queries: str = "query", n_queries: int | None = None,
                 epochs: int | None = None, measure: str = "margin") -> None:
        super().__init__(cfg, queries, n_queries, epochs)
        self.recipe, self.measure = replace(recipe, epochs=epochs or recipe.epochs), measure
        self.epochs = self.recipe.epochs

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        return self.run_weighted(train, train_ids, query, query_ids, seed, None)

    def run_weighted(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int,
                     weights: torch.Tensor | None) -> torch.Tensor:
        family = family_for(self.cfg)
        task = family.task(self.cfg)
        model = replace(self.recipe, seed=seed).train(lambda: family.fresh_model(self.cfg), train, task, weights)
        return measure_queries(model, task, query, self.measure)


class UserSubsetJob(SubsetJob):
    """Retrain with ``train.factory`` on the rows; measure every query (``measure`` as in
    :func:`pipelines.families.capabilities.measure_queries`)."""

    def __init__(self, cfg: RunConfig, queries: str = "query", n_queries: int | None = None,
                 epochs: int | None = None, measure: str = "margin") -> None:
        super().__init__(cfg, queries, n_queries, epochs)
        self.measure = measure

    def __call__(self, task: tuple[np.ndarray, int]) -> np.ndarray:
        rows, seed = task
        torch.set_num_threads(1)
        cfg, family = self.cfg, family_for(self.cfg)
        data = family.datasets(cfg)
        train = data["train"].select(np.asarray(rows, dtype=np.int64))
        query = data["query"] if self.n_queries is None else data["query"].select(range(self.n_queries))
        model = family.build_model(cfg)
        state = import_object(cfg.train.factory, cfg.code_dir, "train.factory")(model, train, int(seed))
        if isinstance(state, nn.Module):
            state = state.state_dict()
        apply_checkpoint(model, state, "the state_dict train.factory returned")
        fn = family.task(cfg)
        out = [measure_queries(model, fn, batch, getattr(self, "measure", "margin"))
               for _, batch in iter_batches(query, family.collate(cfg), 256)]
        if fn.kind == "classification" and getattr(self, "measure", "margin") == "both":  # outputs of all, then hits
            m = [len(o) // 2 for o in out]
            out = [o[:k] for o, k in zip(out, m)] + [o[k:] for o, k in zip(out, m)]
        return torch.cat(out).double().numpy()


def final_checkpoints(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last checkpoint of every training run (what "the model predicts" means): entries grouped
    by the run a recorder noted (``recorded_model``), else by ``model`` (a run trained here, or a
    listed file: each its own), in recorded order."""
    last: dict[Any, dict[str, Any]] = {}
    for entry in entries:
        last[entry.get("recorded_model", entry.get("model", 0))] = entry
    return list(last.values())


class TaskCapabilities:
    """Mixin: predictions, accuracy and retraining from the task's kind (module docstring)."""

    def _kind(self, cfg: RunConfig) -> str:
        return self.task(cfg).kind  # type: ignore[attr-defined]

    def check_metric_of(self, cfg: RunConfig) -> str:
        """What curate's check averages over the queries: top-1 ``accuracy``, or an LM's ``log_prob``."""
        return "log_prob" if self._kind(cfg) == "causal-lm" else "accuracy"

    def unlearning_hits_of(self, cfg: RunConfig) -> bool:
        """Whether unlearning outputs carry top-1 hits after the outputs (classifiers only)."""
        return self._kind(cfg) == "classification"

    def fresh_model(self, cfg: RunConfig) -> nn.Module:
        """The model a retraining starts from (``train.init``); default: :meth:`build_model`."""
        return self.build_model(cfg)  # type: ignore[attr-defined]

    def example_predictions(self, cfg: RunConfig, paths: RunPaths, split: str = "train") -> dict[str, np.ndarray]:
        """Per example of ``split``, averaged over the last checkpoint of every training run
        (:func:`final_checkpoints`; :func:`tda.featurizers.predictions.example_predictions`)."""
        task = self.task(cfg)  # type: ignore[attr-defined]
        if task.kind not in PREDICTED_KINDS:
            raise ConfigError(f"per-example predictions need a classification or causal-LM task; model.task gives "
                              f"{type(task).__name__} of kind {task.kind!r}")
        files = [paths.checkpoint_file(e) for e in final_checkpoints(load_checkpoint_list(paths))]

        def predict() -> dict[str, np.ndarray]:
            return example_predictions(self.build_model(cfg), files, self.datasets(cfg, paths)[split],  # type: ignore[attr-defined]
                                       self.collate(cfg), task, cfg.featurize.batch_size)  # type: ignore[attr-defined]

        read = [paths.checkpoint_list, *files, *self.data_files(cfg, paths)]  # type: ignore[attr-defined]
        kept = held(("predictions", split, config_key(cfg)), lambda: read, predict, paths)
        return {key: value.copy() for key, value in kept.items()}  # once per command (pipelines.held)

    def query_accuracy(self, cfg: RunConfig, paths: RunPaths) -> float | None:
        """Mean top-1 accuracy of the attributed checkpoints on the run's queries (None: no classes)."""
        if self._kind(cfg) != "classification":
            return None
        preds = self.example_predictions(cfg, paths, split="query")
        return float(np.mean(preds["predicted"] == preds["labels"]))

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None,
                   measure: str = "margin") -> Any:
        """Retraining on subsets: ``train.factory`` when set, else the generic recipe."""
        if cfg.train.factory:
            return UserSubsetJob(cfg, queries, epochs=epochs, measure=measure)
        if self._kind(cfg) not in PREDICTED_KINDS:
            raise ConfigError("retraining with the generic recipe needs a classification or causal-LM task; set "
                              "train.factory to your own training function")
        recipe, sources = resolve_recipe(cfg)
        import sys

        print("retraining recipe: " + ", ".join(f"{k} {v} ({sources[k]})" for k, v in recipe.to_dict().items()),
              file=sys.stderr)
        return RecipeSubsetJob(cfg, recipe, queries, epochs=epochs, measure=measure)

    def accuracy_job(self, cfg: RunConfig) -> Any:
        """curate's check: per query a top-1 hit (an LM: its log-probability)."""
        return self.subset_job(cfg, measure="correct")

    def unlearning_job(self, cfg: RunConfig) -> Any:
        """unlearn's check: per query its output, then (classifiers) its top-1 hit."""
        return self.subset_job(cfg, measure="both")


__all__ = ["final_checkpoints", "RecipeSubsetJob", "TaskCapabilities", "UserSubsetJob", "measure_queries", "recorded_recipe", "resolve_recipe"]
