"""The ``classifier`` family: image classifiers (MLP or small CNN) on MNIST, Fashion-MNIST or
CIFAR-2, attributed through the classification margin (docs/methods.md section 1).

Training: SGD with a linearly decaying rate (:func:`pipelines.families.training.train_classifier`), one model per
seed. Features: projected gradients (dense or factored) or the last hidden layer's output.
Retraining (validation, AirRep): the same recipe on subsets; AirRep's training queries are
training images outside the training subset. Per-example predictions and losses come from the
task, through the same route as a user's model (:class:`.capabilities.TaskCapabilities`); the
training recipe is the generic one (:class:`tda.workflows.recipe.TrainRecipe`) at the demo's settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from tda.data.loading import mnist_collate
from tda.errors import ConfigError
from tda.featurizers.gradient import load_checkpoint
from tda.models.reference import mlp
from tda.models.tasks import ClassificationTask, Task, classification_margin

from pipelines.layout import load_checkpoint_list
from pipelines.families.base import Family, Reporting, Representations, Retraining, SaveFn, collated
from pipelines.families.capabilities import TaskCapabilities
from pipelines.families.images import IMAGE_DATA, ImageCollate, image_datasets, unused_train_rows
from pipelines.families.jobs import SubsetJob
from pipelines.families.registry import family_for, register_family
from pipelines.families.training import MOMENTUM, WEIGHT_DECAY, accuracy, train_classifier

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig


def small_cnn(shape: tuple[int, int, int], channels: list[int], classes: int) -> nn.Sequential:
    """Conv3x3-ReLU-MaxPool per width in ``channels``, then a linear layer; takes flat (B, C*H*W)."""
    layers: list[nn.Module] = [nn.Unflatten(1, shape)]
    c_in, size = shape[0], shape[1]
    for width in channels:
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = width, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * size * size, classes))


class ClassifierFamily(TaskCapabilities, Representations, Retraining, Reporting, Family):
    """Image classifiers (MLP or small CNN) attributed through the classification margin."""

    name = "classifier"
    archs = ("mlp", "cnn")
    data_names = tuple(IMAGE_DATA)
    feature_kinds = ("gradients", "representations")
    label_key = "y"

    def learning_rates(self, cfg: RunConfig, paths: RunPaths | None) -> list[float]:
        """The rate each checkpoint's epoch was trained with: the linearly decaying SGD schedule of
        :func:`pipelines.families.training.train_classifier`."""
        if paths is None:
            raise ConfigError("tracin takes its checkpoints' epochs from the run folder; pass paths")
        from pipelines.layout import load_checkpoint_list

        return [cfg.train.lr * (1.0 - entry["epoch"] / cfg.train.epochs) for entry in load_checkpoint_list(paths)]

    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        return image_datasets(cfg)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        shape, classes, _ = IMAGE_DATA[cfg.data.name]
        if cfg.model.arch == "cnn":
            return small_cnn(shape, list(cfg.model.hidden), classes)
        return mlp(int(np.prod(shape)), tuple(cfg.model.hidden), classes)

    def task(self, cfg: RunConfig) -> Task:
        return ClassificationTask()

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        if cfg.data.name == "mnist":
            return mnist_collate
        return ImageCollate(*IMAGE_DATA[cfg.data.name][2])

    def train(self, cfg: RunConfig, paths: RunPaths, model_index: int, save: SaveFn) -> dict[str, Any]:
        t, data, collate = cfg.train, self.datasets(cfg, paths), self.collate(cfg)
        train_b = collated(data["train"], collate)
        model = train_classifier(lambda: self.build_model(cfg), train_b["x"], train_b["y"], epochs=t.epochs,
                                 lr=t.lr, batch_size=t.batch_size, seed=t.seed + model_index, on_epoch=save)
        # the training side records nothing about the queries (they change without retraining)
        return {"train_accuracy": accuracy(model, train_b["x"], train_b["y"])}

    def query_accuracy(self, cfg: RunConfig, paths: RunPaths) -> float | None:
        """Mean accuracy on the run's current queries of each model's last attributed checkpoint."""
        query_b = collated(self.datasets(cfg, paths)["query"], self.collate(cfg))
        if "y" not in query_b:
            return None
        last: dict[int, dict[str, Any]] = {}
        for entry in load_checkpoint_list(paths):
            last[entry.get("model", 0)] = entry
        model, accs = self.build_model(cfg), []
        for entry in last.values():
            model.load_state_dict(load_checkpoint(paths.checkpoint_file(entry)))
            accs.append(accuracy(model, query_b["x"], query_b["y"]))
        return float(np.mean(accs)) if accs else None

    def representation_module(self, cfg: RunConfig) -> str:
        """The last hidden layer: the module before the final Linear (MLP: its last ReLU; CNN: the Flatten)."""
        return str(len(self.build_model(cfg)) - 2)

    def airrep_queries(self, cfg: RunConfig) -> Any:
        """Training-split images outside the training subset (never trained on, never queried)."""
        from pipelines.spec.options import score_options

        return unused_train_rows(cfg, score_options(cfg, self).queries)

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None) -> Any:
        return ClassifierSubsetJob(cfg, queries, epochs=epochs)

    def accuracy_job(self, cfg: RunConfig) -> Any:
        """Trains the recipe on given rows; per query, 1.0 where the model's top class is its label."""
        return ClassifierSubsetJob(cfg, "query", measure="correct")

    def unlearning_job(self, cfg: RunConfig) -> Any:
        """Trains the recipe on given rows; per query its margin, then its top-1 hit ((2m,) outputs)."""
        return ClassifierSubsetJob(cfg, "query", measure="both")

    def magic_recipe(self, cfg: RunConfig) -> Any:
        """The run's first model as a :class:`tda.scorers.magic.SGDRecipe` (:func:`train_classifier`'s defaults)."""
        from tda.scorers.magic import SGDRecipe

        t = cfg.train
        return SGDRecipe(epochs=t.epochs, lr=t.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                         batch_size=t.batch_size, seed=t.seed, schedule="epoch-linear")


class ClassifierSubsetJob(SubsetJob):
    """Train the classifier recipe on the rows (or on all rows with data weights); the margin of every query."""

    supports_weights = True

    def __init__(self, cfg: RunConfig, queries: str = "query", n_queries: int | None = None,
                 epochs: int | None = None, measure: str = "margin") -> None:
        super().__init__(cfg, queries, n_queries, epochs)
        self.measure = measure  # "margin" (attributed output) or "correct" (top-1 hit per query)

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        return self.run_weighted(train, train_ids, query, query_ids, seed, None)

    def run_weighted(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int,
                     weights: torch.Tensor | None) -> torch.Tensor:
        t, family = self.cfg.train, family_for(self.cfg)
        model = train_classifier(lambda: family.build_model(self.cfg), train["x"], train["y"], epochs=self.epochs,
                                 lr=t.lr, batch_size=t.batch_size, seed=seed, weights=weights)
        measure = {"margin": classification_margin, "correct": top1_hit, "both": margin_and_hit}[self.measure]
        with torch.no_grad():
            parts = [measure(model(query["x"][lo: lo + 4096]), query["y"][lo: lo + 4096])
                     for lo in range(0, len(query["y"]), 4096)]
        return torch.cat(parts, dim=-1).reshape(-1)  # "both": (2m,), margins first


def margin_and_hit(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row the margin then the top-1 hit: (B, C), (B,) -> (2, B), concatenated over blocks on dim 1."""
    return torch.stack([classification_margin(logits, y), top1_hit(logits, y)])


def top1_hit(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1.0 where the top class is the label, else 0.0; (B, C), (B,) -> (B,)."""
    return (logits.argmax(1) == y).double()


register_family(ClassifierFamily())
