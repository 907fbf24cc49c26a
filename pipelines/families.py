"""Model families: everything the staged pipeline needs to know about a kind of model.

The stages (train -> featurize -> index -> score -> report) are generic; what depends on the
kind of model comes from the run's family, named by ``model.family`` (default ``classifier``):

- ``datasets(cfg, paths)``: train and query ``datasets.Dataset`` s, each with a unique integer
  ``id`` column (``paths`` is the run folder, ``None`` outside a run);
- ``build_model(cfg)``: a fresh ``nn.Module``; ``task(cfg)``: the output function
  (:class:`tda.tasks.Task`); ``collate(cfg)``: dataset rows -> dict of tensors;
- ``train(cfg, paths, model_index, save)``: train model ``model_index`` (seed
  ``train.seed + model_index``), calling ``save(epoch, model, **info)`` at every epoch of
  :meth:`Family.checkpoint_epochs`; returns a summary stored with its last checkpoint.

Defaults that a family may override: ``checkpoint_epochs``, ``train_outputs`` (extra files a
finished model must have), ``featurizer`` (per split), ``feature_tag`` (what beyond the config
sections changes features), ``scorer``, ``report`` (text printed by ``tda run``; ``None`` uses the
generic label report), ``check`` (arch, data set, scorer, ``model.options``, ``score.options``).

Representation scorers (``repsim``, ``airrep``, METHODS.md section 5) store the output of a
named module instead of gradients: a family names its default module
(:meth:`Family.representation_module`, overridden by ``score.options.module``) and, when its
model is not called as ``model(batch["x"])``, how a batch becomes model inputs
(:meth:`Family.representation_inputs`). AirRep also needs training queries disjoint from the
training set and the evaluation queries (:meth:`Family.airrep_queries`, checked on
:meth:`Family.provenance`) and a subset retraining job (:meth:`Family.subset_job`).

Registering a family is one call::

    @dataclass
    class LMOptions:                     # parsed from model.options (typos are reported)
        context: int = 128

    class CausalLMFamily(Family):
        name, archs, data_names, scorers = "causal-lm", ("gpt",), ("tinystories",), ("trak",)
        options_type = LMOptions
        def datasets(self, cfg, paths=None): ...
        def build_model(self, cfg): ...
        def task(self, cfg): ...
        def collate(self, cfg): ...
        def train(self, cfg, paths, model_index, save): ...

    register_family(CausalLMFamily())

after which a config with ``model: {family: causal-lm, arch: gpt, options: {context: 64}}`` runs
with ``tda run``. Families: ``classifier`` here (MNIST, Fashion-MNIST, CIFAR-2; MLP or small
CNN; TRAK) and ``diffusion`` in :mod:`pipelines.diffusion_family` (DDPM on MNIST; D-TRAK,
Diffusion-TracIn, Diffusion-ReTrac), imported at the end of this module so that importing the
registry registers every family.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from stores._io import fingerprint
from tda.data import MNIST_MEAN, MNIST_STD, arrow_columns, example_ids, load_mnist, mnist_collate
from tda.errors import CheckpointError, ConfigError, DataError
from tda.factored import FactoredFeaturizer, FactoredProjector, factored_layers
from tda.featurize import Featurizer
from tda.models import mlp
from tda.representations import RepresentationFeaturizer
from tda.scorers import RepSimScorer, make_scorer
from tda.tasks import ClassificationTask, Task
from tda.training import accuracy, train_classifier

from .score_options import REPRESENTATION_SCORERS, score_options

if TYPE_CHECKING:
    from .config import RunConfig
    from .run import RunPaths

SaveFn = Callable[..., None]


class Family:
    """Base class of model families (see the module docstring); subclasses fill the hooks."""

    name: str = "family"
    archs: tuple[str, ...] = ()
    data_names: tuple[str, ...] = ()
    scorers: tuple[str, ...] = ("trak",)
    options_type: type | None = None  # dataclass of model.options; None: no options
    #: AirRep's budget where score.options leaves it unset: training queries, subsets, and the
    #: subset models' epochs as a share of train.epochs (rounded up); sized to take minutes
    airrep_budget: tuple[int, int, float] = (256, 32, 0.5)
    label_key: str | None = None  # batch entry of class labels (label-aware representations), if any

    # -- required hooks
    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def build_model(self, cfg: RunConfig) -> nn.Module:
        raise NotImplementedError

    def task(self, cfg: RunConfig) -> Task:
        raise NotImplementedError

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train(self, cfg: RunConfig, paths: RunPaths, model_index: int, save: SaveFn) -> dict[str, Any]:
        raise NotImplementedError

    # -- defaults
    def check(self, cfg: RunConfig) -> None:
        """Raise :class:`ConfigError` unless arch, data set and scorer suit the family."""
        for key, value, allowed in (("model.arch", cfg.model.arch, self.archs),
                                    ("data.name", cfg.data.name, self.data_names),
                                    ("score.scorer", cfg.score.scorer, self.scorers)):
            if value not in allowed:
                raise ConfigError(f"{key} is {value!r}; the {self.name!r} family supports: choose one of {allowed}")
        self.options(cfg)
        if getattr(score_options(cfg), "label_aware", False) and self.label_key is None:
            raise ConfigError(f"score.options.label_aware needs class labels; the {self.name!r} family has none")

    def options(self, cfg: RunConfig) -> Any:
        """``model.options`` parsed into :attr:`options_type`."""
        from .config import _build

        if self.options_type is None:
            if cfg.model.options:
                raise ConfigError(f"the {self.name!r} family takes no model.options, got {sorted(cfg.model.options)}")
            return None
        return _build(self.options_type, cfg.model.options, "model.options")

    def checkpoint_epochs(self, cfg: RunConfig) -> list[int]:
        """Epochs after which :meth:`train` saves a checkpoint (the last epoch included)."""
        return list(range(cfg.train.epochs))

    @staticmethod
    def spread_epochs(cfg: RunConfig, saved: int) -> list[int]:
        """The last epoch for ``train.checkpoints: final``, else ``saved`` epochs spread evenly."""
        epochs = cfg.train.epochs
        if cfg.train.checkpoints == "final":
            return [epochs - 1]
        n = min(saved, epochs)
        return sorted({round((j + 1) * epochs / n) - 1 for j in range(n)})

    def train_outputs(self, cfg: RunConfig, paths: RunPaths, model_index: int) -> list[Path]:
        """Files besides checkpoints that a trained model must have left (else it is retrained)."""
        return []

    def featurizer(self, cfg: RunConfig, split: str, paths: RunPaths | None = None) -> Any:
        """Featurizer of a split (``"train"`` or ``"query"``): ``featurize``, ``spec``, ``projector``;
        representations for ``repsim`` / ``airrep``, else projected gradients; ``featurize.projection``
        picks the dense or the factored (per-layer Kronecker) projection."""
        if self.uses_representations(cfg):
            return self.representation_featurizer(cfg, split)
        f = cfg.featurize
        if f.projection == "factored":
            with featurize_params_named():
                return FactoredFeaturizer(self.build_model(cfg), self.task(cfg), k_in=f.k_in, k_out=f.k_out,
                                          seed=f.seed, kind=f.projector, layers=f.params,
                                          device=resolve_device(f.device))
        return Featurizer(self.build_model(cfg), self.task(cfg), k=f.k, seed=f.seed, kind=f.projector,
                          param_names=f.params, device=resolve_device(f.device), backend=f.backend)

    def feature_tag(self, cfg: RunConfig) -> str:
        """Appended to the feature fingerprint when settings outside data/model/train/featurize
        change the features: the representation module for ``repsim`` / ``airrep``, else empty."""
        if self.uses_representations(cfg):
            label = {"label_aware": True} if score_options(cfg).label_aware else {}
            return "-repr-" + fingerprint({"module": self.module_name(cfg), **label})
        return ""

    def scorer(self, cfg: RunConfig, paths: RunPaths | None = None) -> Any:
        """The scorer ``score.scorer`` names: TRAK with the configured ridge, TracInCP with
        :meth:`learning_rates`, RepSim / AirRep with ``score.options``, any other
        :func:`tda.scorers.make_scorer` name with its defaults."""
        name = cfg.score.scorer
        if name == "trak":
            return make_scorer("trak", lambda_rel=cfg.score.lambda_rel)
        if name == "tracin":
            return make_scorer("tracin", learning_rates=self.learning_rates(cfg, paths))
        if name == "repsim":
            return RepSimScorer(score_options(cfg).metric)
        if name == "airrep":
            from .airrep import airrep_scorer

            return airrep_scorer(cfg, paths)
        return make_scorer(name)

    # -- representation scorers (repsim, airrep)
    @staticmethod
    def uses_representations(cfg: RunConfig) -> bool:
        return cfg.score.scorer in REPRESENTATION_SCORERS

    def representation_module(self, cfg: RunConfig) -> str:
        """The family's default module whose output is h(z)."""
        raise ConfigError(f"the {self.name!r} family names no representation module; set score.options.module")

    def module_name(self, cfg: RunConfig) -> str:
        """``score.options.module``, else :meth:`representation_module`."""
        return score_options(cfg).module or self.representation_module(cfg)

    def representation_inputs(self, cfg: RunConfig, split: str) -> Callable | None:
        """``inputs(batch, ids)`` of :class:`~tda.representations.RepresentationFeaturizer`
        (``None``: the model is called as ``model(batch["x"])``)."""
        return None

    def representation_featurizer(self, cfg: RunConfig, split: str) -> RepresentationFeaturizer:
        """Representations of :meth:`module_name` (label-aware with ``score.options.label_aware``
        where the family has labels: :attr:`label_key`); the width is probed on one training example."""
        label = self.label_key if score_options(cfg).label_aware else None
        feat = RepresentationFeaturizer(self.build_model(cfg).eval(), self.module_name(cfg),
                                        device=resolve_device(cfg.featurize.device),
                                        inputs=None if label else self.representation_inputs(cfg, split),
                                        label_key=label)
        train = self.datasets(cfg)["train"]
        feat.probe(collated(train.select(range(1)), self.collate(cfg)), example_ids(train)[:1])
        return feat

    def airrep_queries(self, cfg: RunConfig) -> Any:
        """AirRep's training queries (a ``datasets.Dataset`` with ids), disjoint from the training
        set and the evaluation queries; ``score.options.queries`` of them."""
        raise ConfigError(f"the {self.name!r} family provides no AirRep training queries")

    def provenance(self, cfg: RunConfig, role: str, paths: RunPaths | None = None) -> list[str]:
        """Keys naming where each example of ``role`` (``"train"``, ``"query"``, ``"airrep"``) comes
        from; equal keys are the same underlying example (:func:`tda.airrep.check_disjoint`).
        Default: ``<data.name>/<split>/<id>`` with ids as positions in the split."""
        d = cfg.data
        if role not in ("train", "query", "airrep"):
            raise ConfigError(f"provenance role {role!r} is unknown; use 'train', 'query' or 'airrep'")
        if role == "airrep":
            return [f"{d.name}/train/{i}" for i in example_ids(self.airrep_queries(cfg))]
        split = "train" if role == "train" else d.query_split
        return [f"{d.name}/{split}/{i}" for i in example_ids(self.datasets(cfg, paths)[role])]

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None) -> Any:
        """A picklable retraining job on subsets (:mod:`pipelines.subset_jobs`)."""
        raise ConfigError(f"the {self.name!r} family has no subset retraining job")

    def learning_rates(self, cfg: RunConfig, paths: RunPaths | None) -> list[float]:
        """TracIn's learning rate per checkpoint: the ``lr`` that :meth:`train` recorded for each."""
        if paths is None:
            raise ConfigError(f"{cfg.score.scorer} takes its learning rates from the run folder's checkpoints")
        entries = load_checkpoint_list(paths)
        if any("lr" not in e for e in entries):
            raise CheckpointError(f"{paths.checkpoint_list} records no learning rates; rerun the train stage")
        return [float(e["lr"]) for e in entries]

    def report(self, cfg: RunConfig, paths: RunPaths) -> str | None:
        """Report text printed by ``tda run``; ``None``: the generic proponent/opponent report."""
        return None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, replace: bool = False) -> Family:
    """Make ``family`` available as ``model.family: <family.name>``; returns it."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family needs a Family instance, got {type(family).__name__}")
    if family.name in _FAMILIES and not replace:
        raise ConfigError(f"model family {family.name!r} is already registered; pass replace=True")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"model.family is {name!r}; choose one of {tuple(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_for(cfg: RunConfig) -> Family:
    return get_family(cfg.model.family)


def check_config(cfg: RunConfig) -> None:
    """Checks that need the family (called when a RunConfig is built)."""
    family_for(cfg).check(cfg)


# ------------------------------------------------------------------ shared helpers
@contextmanager
def featurize_params_named() -> Iterator[None]:
    """Prefix the factored projection's layer-selection errors with the config key that sets it."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"featurize.params: {exc}") from exc


def projection_width(cfg: RunConfig) -> int:
    """Width of one projected gradient: ``featurize.k`` (dense) or the factored projection's
    ``sum over layers of k_out * k_in`` for the family's model."""
    f = cfg.featurize
    if f.projection == "dense":
        return f.k
    with featurize_params_named():
        layers = factored_layers(family_for(cfg).build_model(cfg), f.params)
    return FactoredProjector(layers, f.k_in, f.k_out).k


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("featurize.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def load_checkpoint_list(paths: RunPaths) -> list[dict[str, Any]]:
    if not paths.checkpoint_list.is_file():
        raise CheckpointError(f"{paths.checkpoint_list} is missing; run the train stage first")
    return json.loads(paths.checkpoint_list.read_text())["checkpoints"]


@functools.lru_cache(maxsize=8)
def load_idx_split(root: str, split: str, limit: int | None, name: str = "mnist"):
    """Cached MNIST-format split (MNIST or Fashion-MNIST idx files) as a ``datasets.Dataset``."""
    if name == "fashion-mnist" and not Path(root).is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist; install Debian's dataset-fashion-mnist "
                        "package (it fills /usr/share/datasets/fashion-mnist) or set data.root to its idx files")
    return load_mnist(root, split, limit)


CIFAR2_FILE = "cifar2_cat_dog_from_jpeg_uint8.npz"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=4)
def load_cifar2(root: str, split: str, limit: int | None):
    """CIFAR-2 (cat 0, dog 1) as a Dataset: ``id``, ``image`` (3072 uint8, channel-major), ``label``."""
    import datasets
    import pyarrow as pa

    path = Path(root) / CIFAR2_FILE
    if not path.is_file():
        raise DataError(f"CIFAR-2 file {path} not found; set data.root to the folder holding {CIFAR2_FILE} "
                        "(../shared/data/cifar10 in this project)")
    with np.load(path, allow_pickle=False) as z:
        x, y = z[f"x_{split}"][:limit], z[f"y_{split}"][:limit]  # (n, 32, 32, 3) uint8, (n,)
    flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(-1)  # channel-major rows
    return datasets.Dataset(pa.table({
        "id": pa.array(np.arange(len(x), dtype=np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(flat), 3 * 32 * 32),
        "label": pa.array(np.asarray(y, dtype=np.int64)),
    }))


class ImageCollate:
    """Rows -> ``{"x": (B, C*H*W) float32 normalised per channel, "y": (B,) int64}`` (picklable)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        x = np.asarray(rows["image"], dtype=np.float32).reshape(len(rows["image"]), len(self.mean), -1) / 255.0
        x = (x - self.mean[None, :, None]) / self.std[None, :, None]
        return {"x": torch.from_numpy(x.reshape(x.shape[0], -1)),
                "y": torch.from_numpy(np.array(rows["label"], dtype=np.int64))}


def image_query_file(cfg: RunConfig):
    """Image queries from ``data.query_path`` (parquet/arrow/csv/json, see :mod:`tda.query_files`),
    checked against the data set's image shape and classes; cached per process."""
    return _image_query_file(cfg.data.query_path, cfg.data.query_size, cfg.data.name)


@functools.lru_cache(maxsize=4)
def _image_query_file(path: str, limit: int, name: str):
    from tda.query_files import image_queries, load_table

    shape, classes, _ = IMAGE_DATA[name]
    return image_queries(load_table(path, limit), shape, classes)


def train_split_tail(cfg: RunConfig, load: Callable[[int], Any]) -> Any:
    """Rows ``[n, n + Q)`` of the training split (``n = data.train_size``, ``Q =
    score.options.queries``): examples the run never trains on, for AirRep's training queries.

    Args:
        load: ``load(limit)`` -> the first ``limit`` rows of the training split.
    """
    n, q = cfg.data.train_size, score_options(cfg).queries
    if n is None:
        raise DataError("AirRep takes its training queries from the training split after data.train_size; "
                        "set data.train_size below the split's size")
    rows = load(n + q)
    if len(rows) < n + q:
        raise DataError(f"AirRep needs {q} training queries after the first {n} training examples, but the "
                        f"training split has {len(rows)} rows; lower data.train_size or score.options.queries")
    return rows.select(range(n, n + q))


def collated(dataset: Any, collate: Callable) -> dict[str, torch.Tensor]:
    """The whole dataset collated at once (small demo sets)."""
    return collate(arrow_columns(dataset.with_format("arrow")[:]))


def small_cnn(shape: tuple[int, int, int], channels: list[int], classes: int) -> nn.Sequential:
    """Conv3x3-ReLU-MaxPool per width in ``channels``, then a linear layer; takes flat (B, C*H*W)."""
    layers: list[nn.Module] = [nn.Unflatten(1, shape)]
    c_in, size = shape[0], shape[1]
    for width in channels:
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, size = width, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * size * size, classes))


# ------------------------------------------------------------------ classifier family
IMAGE_DATA = {  # name: (image shape, classes, normalisation)
    "mnist": ((1, 28, 28), 10, ((MNIST_MEAN,), (MNIST_STD,))),
    "fashion-mnist": ((1, 28, 28), 10, ((0.2860,), (0.3530,))),
    "cifar2": ((3, 32, 32), 2, (CIFAR_MEAN, CIFAR_STD)),
}


class ClassifierFamily(Family):
    """Image classifiers (MLP or small CNN) attributed through the classification margin."""

    name = "classifier"
    archs = ("mlp", "cnn")
    data_names = tuple(IMAGE_DATA)
    scorers = ("trak", "tracin", "graddot", "gradcos", "repsim", "airrep")
    label_key = "y"

    def learning_rates(self, cfg: RunConfig, paths: RunPaths | None) -> list[float]:
        """The rate each checkpoint's epoch was trained with: the linearly decaying SGD schedule of
        :func:`tda.training.train_classifier`."""
        if paths is None:
            raise ConfigError("tracin takes its checkpoints' epochs from the run folder; pass paths")
        return [cfg.train.lr * (1.0 - entry["epoch"] / cfg.train.epochs) for entry in load_checkpoint_list(paths)]

    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        d = cfg.data
        if d.name == "cifar2":
            out = {"train": load_cifar2(d.root, "train", d.train_size)}
            query = (lambda: load_cifar2(d.root, d.query_split, d.query_size))
        else:
            out = {"train": load_idx_split(d.root, "train", d.train_size, d.name)}
            query = (lambda: load_idx_split(d.root, d.query_split, d.query_size, d.name))
        out["query"] = image_query_file(cfg) if d.query_path else query()
        return out

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
        train_b, query_b = collated(data["train"], collate), collated(data["query"], collate)
        model = train_classifier(lambda: self.build_model(cfg), train_b["x"], train_b["y"], epochs=t.epochs,
                                 lr=t.lr, batch_size=t.batch_size, seed=t.seed + model_index, on_epoch=save)
        return {"query_accuracy": accuracy(model, query_b["x"], query_b["y"])}

    def representation_module(self, cfg: RunConfig) -> str:
        """The last hidden layer: the module before the final Linear (MLP: its last ReLU; CNN: the Flatten)."""
        return str(len(self.build_model(cfg)) - 2)

    def airrep_queries(self, cfg: RunConfig) -> Any:
        """Training-split images after the first ``data.train_size`` (never trained on, never queried)."""
        d = cfg.data
        if d.name == "cifar2":
            return train_split_tail(cfg, lambda limit: load_cifar2(d.root, "train", limit))
        return train_split_tail(cfg, lambda limit: load_idx_split(d.root, "train", limit, d.name))

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None) -> Any:
        from .subset_jobs import ClassifierSubsetJob

        return ClassifierSubsetJob(cfg, queries, epochs=epochs)


register_family(ClassifierFamily())


# ------------------------------------------------------------------ other families
from . import diffusion_family  # noqa: E402,F401  (registers "diffusion")
from . import lm_family  # noqa: E402,F401  (registers "causal-lm")
