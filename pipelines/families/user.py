"""The ``user`` family: your own ``nn.Module``, checkpoints and data, named in the config.

``model.factory`` (``"module:callable"`` importable from beside the config, or
``"path/to/file.py:callable"``) builds the model, called with ``model.options`` as keyword
arguments; ``model.checkpoints`` lists its trained ``state_dict`` files (``.pt``, loaded with
``weights_only=True``, or ``.safetensors``), so no training runs. Data: ``data.train_path`` and
``data.query_path`` (a ``save_to_disk`` folder, ``.parquet``, ``.arrow``, ``.csv``, ``.json``);
without ``data.train_path`` the demo image set ``data.name`` is used. Rows keep an ``id`` column
(else their position in the file), and ``data.train_size`` / ``query_size`` draw seeded subsets
stratified by ``data.label_column``.

``data.collate`` turns a dict of columns into the task's tensors; the built-in collate reads
``data.image_column`` (or an ``x`` column) as float32 (integer pixels scaled to [0, 1]) and
``data.label_column`` as int64: ``{"x": ..., "y": ...}``, what ``ClassificationTask`` reads.
``model.task``: ``classification`` (the margin, default), ``causal-lm`` (``tda.models.lm.LMTask`` on
``input_ids`` / ``loss_mask``) or ``"module:Class"`` (your :class:`tda.models.tasks.Task`).
Retraining (``tda validate``, curate's and unlearn's checks, AirRep) uses the generic recipe
(:mod:`.capabilities`, ``train:`` keys) or your ``train.factory`` (``fn(model, dataset, seed) -> state_dict``).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from tda.data.loading import draw_subset, example_ids
from tda.errors import ConfigError, DataError
from tda.models.tasks import ClassificationTask, Task
from tda.data.query_files import non_integers

from pipelines.imports import import_object
from pipelines.families.base import Family, Representations, Retraining
from pipelines.families.capabilities import TaskCapabilities, UserSubsetJob  # noqa: F401  (UserSubsetJob: re-exported)
from pipelines.families.images import IMAGE_DATA, image_datasets, with_label_noise
from pipelines.families.registry import register_family

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)


class UserFamily(TaskCapabilities, Representations, Retraining, Family):
    """A model built by the user's factory, with checkpoints and data from files."""

    name = "user"
    feature_kinds = ("gradients", "representations")
    label_key = "y"
    trains = False

    def check(self, cfg: RunConfig) -> None:
        if not cfg.model.factory:
            raise ConfigError("the 'user' family builds your model with model.factory: set it to 'module:callable' "
                              "or 'path/to/file.py:callable'")
        if cfg.data.train_path is None and cfg.data.name not in IMAGE_DATA:
            raise ConfigError("set data.train_path to your training set (a save_to_disk folder, .parquet, .arrow, "
                              ".csv or .json file)")
        if cfg.data.train_path is not None and cfg.data.query_path is None:
            raise ConfigError("set data.query_path to the examples to explain (same formats as data.train_path)")
        super().check(cfg)

    def options(self, cfg: RunConfig) -> dict[str, Any]:
        """``model.options``: keyword arguments of the factory, passed as they are."""
        return dict(cfg.model.options)

    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        d = cfg.data
        if d.train_path is None:
            return image_datasets(cfg)
        train = table_subset(d.train_path, d.train_size, d.seed, d.label_column, d.subset, "data.train_path")
        data = {"train": with_label_noise(train, cfg, column=d.label_column),
                "query": table_subset(d.query_path, d.query_size, d.seed + 1, d.label_column, d.subset,
                                      "data.query_path")}
        if not d.collate and type(self.task(cfg)) is ClassificationTask:  # the built-in collate feeds it labels
            for split, table in data.items():
                _check_labels(table, d.label_column, f"data.{split}_path {getattr(d, split + '_path')}")
        return data

    def build_model(self, cfg: RunConfig) -> nn.Module:
        factory = import_object(cfg.model.factory, cfg.code_dir, "model.factory")
        try:
            model = factory(**cfg.model.options)
        except TypeError as exc:
            raise ConfigError(f"model.factory {cfg.model.factory} cannot be called with model.options "
                              f"{cfg.model.options}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.factory {cfg.model.factory} returned a {type(model).__name__}, not an nn.Module")
        return model

    def task(self, cfg: RunConfig) -> Task:
        return task_from_config(cfg)

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        d = cfg.data
        if d.collate:
            return import_object(d.collate, cfg.code_dir, "data.collate")
        return ColumnsCollate(d.image_column, d.label_column, d.image_layout, d.image_scale)

    def representation_module(self, cfg: RunConfig) -> str:
        """The module before the last one that holds parameters (the last hidden layer)."""
        leaves = [(n, m) for n, m in self.build_model(cfg).named_modules() if n and not list(m.children())]
        owners = [i for i, (_, m) in enumerate(leaves) if any(True for _ in m.parameters(recurse=False))]
        if not owners or owners[-1] == 0:
            raise ConfigError("cannot tell your model's last hidden layer; set score.options.module")
        return leaves[owners[-1] - 1][0]


    def airrep_queries(self, cfg: RunConfig) -> Any:
        """AirRep's training queries: rows of ``data.train_path`` outside the ``data.train_size``
        subset (never trained on), in file order; ``score.options.queries`` of them."""
        from pipelines.spec.options import score_options

        d, count = cfg.data, score_options(cfg, self).queries
        if d.train_path is None:
            from pipelines.families.images import unused_train_rows

            return unused_train_rows(cfg, count)
        full = table_subset(d.train_path, None, d.seed, d.label_column, d.subset, "data.train_path")
        used = set(example_ids(self.datasets(cfg)["train"]).tolist())
        free = [r for r, i in enumerate(example_ids(full).tolist()) if i not in used][:count]
        if len(free) < count:
            raise DataError(f"AirRep needs {count} training queries from data.train_path rows outside the training "
                            f"set, but only {len(free)} are left; lower data.train_size or score.options.queries")
        return full.select(free)


def task_from_config(cfg: RunConfig, default: str = "classification") -> Task:
    """``model.task``: a built-in name or ``"module:Class"`` (instantiated without arguments)."""
    name = cfg.model.task or default
    if name == "classification":
        return ClassificationTask()
    if name == "causal-lm":
        from tda.models.lm import LMTask

        return LMTask()
    if ":" not in name:
        raise ConfigError(f"model.task is {name!r}; choose classification, causal-lm or 'module:Class' (your "
                          "tda.models.tasks.Task); diffusion needs the diffusion family")
    obj = import_object(name, cfg.code_dir, "model.task")
    task = obj() if isinstance(obj, type) else obj
    if not isinstance(task, Task):
        raise ConfigError(f"model.task {name} is a {type(task).__name__}, not a tda.models.tasks.Task")
    return task


def table_subset(path: str, size: int | None, seed: int, label_column: str, how: str, key: str):
    """A data file with an ``id`` column (positions when absent), subset as configured (cached)."""
    return _table_subset(path, size, seed, label_column, how, key)


@functools.lru_cache(maxsize=8)
def _table_subset(path: str, size: int | None, seed: int, label_column: str, how: str, key: str):
    from tda.data.query_files import load_table

    table = load_table(path, None, key)
    if "id" not in table.column_names:
        table = table.add_column("id", np.arange(len(table), dtype=np.int64))
    ids = example_ids(table)  # integer and unique, or a clear error
    if len(ids) and int(ids.min()) < 0:
        raise DataError(f"{key} {path}: the 'id' column holds negative ids (e.g. {sorted(set(ids[ids < 0].tolist()))[:3]}); "
                        "ids must be non-negative integers (new inputs are numbered -1, -2, ... in answers): renumber "
                        "them, or drop the column to number rows by position")
    if size is not None and size > len(table):
        logger.warning("%s has %d rows, fewer than the %d asked for; using all of them", key, len(table), size)
    out = draw_subset(table, size, seed, label_column, how)
    if key == "data.train_path" and label_column in out.column_names:
        classes = np.unique(np.asarray(out.with_format("numpy")[label_column]))
        if len(classes) < 2:
            raise DataError(f"the training set ({key} {path}) has a single class {classes.tolist()} in "
                            f"{label_column!r}: every attribution would be meaningless; check the file and the "
                            "column, or raise data.train_size")
    return out


def _check_labels(table, column: str, where: str) -> None:
    """The classification task's label column exists and holds an integer class id in every row."""
    import pyarrow as pa

    if column not in table.column_names:
        raise DataError(f"{where} lacks the label column {column!r} (it has {table.column_names}); the classification "
                        "task needs class ids: add the column, set data.label_column to the column that holds them, "
                        "or set model.task")

    labels = table.with_format("arrow")[column]
    if not pa.types.is_integer(labels.type) or labels.null_count:
        raise DataError(f"{where}: {column!r} must hold an integer class id in every row, got {labels.type} values "
                        f"such as {non_integers(labels.to_pylist())}; fill missing labels and map names to ids (or set data.label_column)")


class ColumnsCollate:
    """Rows -> ``{"x": float32 inputs, "y": int64 labels}`` (picklable): the input column in any
    storage form (lists, nested lists, arrays, PIL images; :mod:`tda.data.images`), laid out by
    ``layout`` (3-D images fed channels-first) and divided by ``scale`` -- the two transforms
    ``data.image_layout`` and ``data.image_scale`` state, and no other."""

    def __init__(self, input_column: str = "image", label_column: str = "label", layout: str = "auto",
                 scale: float | str = "auto") -> None:
        self.input_column, self.label_column, self.layout, self.scale = input_column, label_column, layout, scale

    def __setstate__(self, state: dict) -> None:  # collates pickled before layout/scale existed
        self.__dict__.update({"layout": "auto", "scale": "auto", **state})

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        from tda.data.images import image_batch

        key = self.input_column if self.input_column in rows else "x"
        if key not in rows:
            raise DataError(f"the built-in collate reads column {self.input_column!r} (or 'x'), but the rows have "
                            f"{sorted(rows)}; set data.image_column, or data.collate to your own function")
        out = {"x": torch.from_numpy(image_batch(rows[key], self.layout, self.scale, key))}
        if self.label_column in rows:
            out["y"] = torch.from_numpy(np.array(rows[self.label_column], dtype=np.int64))
        return out


register_family(UserFamily())
