"""The family protocol: what the generic stages need to know about a kind of model.

A :class:`Family` provides five things (the narrow protocol):

- ``datasets(cfg, paths)``: train and query ``datasets.Dataset`` s, each with a unique integer
  ``id`` column (``paths`` is the run folder, ``None`` outside a run);
- ``build_model(cfg)``: a fresh ``nn.Module``; ``task(cfg)``: the output function
  (:class:`tda.models.tasks.Task`); ``collate(cfg)``: dataset rows -> dict of tensors;
- optionally ``train(cfg, paths, model_index, save)``: train model ``model_index`` (seed
  ``train.seed + model_index``), calling ``save(epoch, model, **info)`` at every epoch of
  :meth:`Family.checkpoint_epochs`; families without it need ``model.checkpoints``.

It says which kinds of features it produces (:attr:`Family.feature_kinds`: ``"gradients"``,
``"representations"``, or the diffusion family's ``"grid"`` and ``"slots"``); the scorer registry
(:mod:`pipelines.methods.scorers`) matches scorers to kinds, so a family never lists scorer names.

Optional capabilities are mixins a family inherits when it has them:

- :class:`Representations`: a default module whose output is h(z) (RepSim, AirRep);
- :class:`Retraining`: a picklable subset-retraining job (validation, AirRep supervision), the
  AirRep training queries and provenance keys;
- :class:`Reporting`: the text ``tda run`` prints, rendered from stored results only.

A new family is one file in this package: subclass, then ``register_family(MyFamily())``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from stores._io import fingerprint
from tda.data.loading import arrow_columns, example_ids, iter_batches
from tda.errors import CheckpointError, ConfigError
from tda.featurizers.choice import FALLBACK, ProjectionChoice, choose_projection, structural_choice
from tda.featurizers.spec import SPECS, make_featurizer, projection_spec
from tda.featurizers.representations import RepresentationFeaturizer
from tda.models.tasks import Task

from pipelines.held import config_key, held
from pipelines.layout import RunPaths, json_field, load_checkpoint_list
from pipelines.spec.schema import _build
from pipelines.spec.fingerprints import projection_settings
from pipelines.spec.options import score_options

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig

SaveFn = Callable[..., None]
FEATURE_KINDS = ("gradients", "representations", "grid", "slots")


class Family:
    """Base class of model families (see the module docstring); subclasses fill the protocol."""

    name: str = "family"
    archs: tuple[str, ...] = ()  # allowed model.arch values (empty: not checked)
    data_names: tuple[str, ...] = ()  # allowed data.name values (empty: not checked)
    feature_kinds: tuple[str, ...] = ("gradients",)
    options_type: type | None = None  # dataclass of model.options; None: no options
    label_key: str | None = None  # batch entry of class labels (label-aware representations), if any
    trains: bool = True  # has a training recipe (else model.checkpoints is required)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A family's ``datasets`` is read once per command (:func:`held_datasets`)."""
        super().__init_subclass__(**kwargs)
        if "datasets" in cls.__dict__:
            cls.datasets = held_datasets(cls.__dict__["datasets"], cls)  # type: ignore[method-assign]

    def measure_key(self, cfg: RunConfig) -> dict[str, Any]:
        """What the LDS ground truth's measured f depends on beyond data, model and train (hashed
        into its cache key when not empty; empty keeps the classifier's and LM's keys as they were)."""
        return {}

    # -- the protocol
    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def data_files(self, cfg: RunConfig, paths: RunPaths | None) -> list[Path]:
        """Files in the run folder that :meth:`datasets` reads (a command reads the data sets again
        once one of them changed: :mod:`pipelines.held`); default none."""
        return []

    def build_model(self, cfg: RunConfig) -> nn.Module:
        raise NotImplementedError

    def task(self, cfg: RunConfig) -> Task:
        raise NotImplementedError

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train(self, cfg: RunConfig, paths: RunPaths, model_index: int, save: SaveFn) -> dict[str, Any]:
        raise ConfigError(f"the {self.name!r} family has no training recipe; name trained checkpoints in "
                          "model.checkpoints")

    # -- checks and settings
    def check(self, cfg: RunConfig) -> None:
        """Raise :class:`ConfigError` unless arch, data set and options suit the family."""
        for key, value, allowed in (("model.arch", cfg.model.arch, self.archs),
                                    ("data.name", cfg.data.name, self.data_names)):
            if allowed and value not in allowed:
                raise ConfigError(f"{key} is {value!r}; the {self.name!r} family supports: choose one of {allowed}")
        if not self.trains and not (cfg.model.checkpoints or self.default_checkpoints(cfg)):
            raise ConfigError(f"the {self.name!r} family trains nothing itself: name your trained checkpoints in "
                              "model.checkpoints (a list of files or a glob)")
        self.options(cfg)
        if getattr(score_options(cfg, self), "label_aware", False) and self.label_key is None:
            raise ConfigError(f"score.options.label_aware needs class labels; the {self.name!r} family has none")

    def options(self, cfg: RunConfig) -> Any:
        """``model.options`` parsed into :attr:`options_type`."""
        if self.options_type is None:
            if cfg.model.options:
                raise ConfigError(f"the {self.name!r} family takes no model.options, got {sorted(cfg.model.options)}; "
                                  "remove them")
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

    def default_checkpoints(self, cfg: RunConfig) -> list[str]:
        """Checkpoints attributed when ``model.checkpoints`` is unset and nothing is trained."""
        return []

    def train_outputs(self, cfg: RunConfig, paths: RunPaths, model_index: int) -> list[Path]:
        """Files besides checkpoints that a trained model must have left (else it is retrained)."""
        return []

    # -- features
    def featurizer(self, cfg: RunConfig, split: str, kind: str, paths: RunPaths | None = None) -> Any:
        """Featurizer of a split (``"train"`` or ``"query"``) for a feature ``kind``:
        ``featurize``, ``spec``, ``projector``; ``featurize.projection`` picks the dense or the
        factored (per-layer Kronecker) projection of gradients."""
        if kind == "representations":
            return self._representations().representation_featurizer(cfg, split)
        return gradient_featurizer(cfg, self.build_model(cfg), self.task(cfg), paths)

    def auto_projection(self, cfg: RunConfig, paths: RunPaths, train: Any) -> ProjectionChoice:
        """What ``featurize.projection: auto`` means for this run's model: the measured default
        where it covers the model, checked on the first training rows under the last checkpoint
        (:func:`tda.featurizers.choice.choose_projection`)."""
        _, batch = next(iter_batches(train, self.collate(cfg), 2))
        last = paths.checkpoint_file(load_checkpoint_list(paths)[-1])
        return choose_projection(self.build_model(cfg), self.task(cfg), batch, cfg.featurize.params, last,
                                 resolve_device(cfg.featurize.device))

    def feature_tag(self, cfg: RunConfig, kind: str) -> str:
        """Appended to the feature fingerprint when settings outside data/model/train/featurize
        change the features: the representation module for representations, else empty."""
        if kind == "representations":
            label = {"label_aware": True} if score_options(cfg, self).label_aware else {}
            return "-repr-" + fingerprint({"module": self._representations().module_name(cfg), **label})
        return ""

    def _representations(self) -> "Representations":
        if not isinstance(self, Representations):
            raise ConfigError(f"the {self.name!r} family produces no representations; choose a gradient scorer")
        return self

    def learning_rates(self, cfg: RunConfig, paths: RunPaths | None) -> list[float]:
        """TracIn's learning rate per checkpoint: the ``lr`` that :meth:`train` recorded for each."""
        if paths is None:
            raise ConfigError(f"{cfg.score.scorer} takes its learning rates from the run folder's checkpoints")
        entries = load_checkpoint_list(paths)
        if any("lr" not in e for e in entries):
            raise CheckpointError(f"{paths.checkpoint_list} records no learning rates; TracIn needs the learning "
                                  "rate of each checkpoint: record your checkpoints while training with "
                                  "tda.CheckpointRecorder or tda.integrations.hf.CheckpointCallback (they write "
                                  "tda-checkpoints.json beside them), train in the run, or use graddot / gradcos")
        return [float(e["lr"]) for e in entries]

    def check_metric_of(self, cfg: RunConfig) -> str:
        """What curate's check averages over the queries (``accuracy`` or ``log_prob``)."""
        return getattr(self, "check_metric", "accuracy")

    def unlearning_hits_of(self, cfg: RunConfig) -> bool:
        """Whether unlearning outputs carry top-1 hits after the outputs."""
        return getattr(self, "unlearning_hits", True)

    def extra_results(self, cfg: RunConfig, paths: RunPaths, scorer: Any, kind: str) -> None:
        """Family-specific results the score stage writes after top-k (default: none)."""


class Representations:
    """Capability: features from a module's output h(z) (RepSim, AirRep): the family's default
    module (:meth:`representation_module`, overridden by ``score.options.module``) and, when
    its model is not called as ``model(batch["x"])``, how a batch becomes model inputs."""

    def representation_module(self, cfg: RunConfig) -> str:
        raise ConfigError(f"the {getattr(self, 'name', '?')!r} family names no representation module; set "
                          "score.options.module")

    def module_name(self, cfg: RunConfig) -> str:
        """``score.options.module``, else :meth:`representation_module`."""
        return score_options(cfg, self).module or self.representation_module(cfg)

    def representation_inputs(self, cfg: RunConfig, split: str) -> Callable | None:
        """``inputs(batch, ids)`` of :class:`~tda.featurizers.representations.RepresentationFeaturizer`
        (``None``: the model is called as ``model(batch["x"])``)."""
        return None

    def representation_featurizer(self, cfg: RunConfig, split: str) -> RepresentationFeaturizer:
        """Representations of :meth:`module_name` (label-aware with ``score.options.label_aware``
        where the family has labels: its ``label_key``); the width is probed on one training example."""
        label = self.label_key if score_options(cfg, self).label_aware else None
        feat = RepresentationFeaturizer(self.build_model(cfg).eval(), self.module_name(cfg),
                                        device=resolve_device(cfg.featurize.device),
                                        inputs=None if label else self.representation_inputs(cfg, split),
                                        label_key=label)
        train = self.datasets(cfg)["train"]
        feat.probe(collated(train.select(range(1)), self.collate(cfg)), example_ids(train)[:1])
        return feat


class Retraining:
    """Capability: retrain the family's recipe on subsets (validation and AirRep supervision).

    ``airrep_budget``: AirRep's defaults where ``score.options`` leaves them unset (training
    queries, subsets, subset models' epochs as a share of ``train.epochs``).
    """

    airrep_budget: tuple[int, int, float] = (256, 32, 0.5)

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None) -> Any:
        """A picklable retraining job on subsets (:class:`pipelines.families.jobs.SubsetJob`)."""
        raise NotImplementedError

    def airrep_queries(self, cfg: RunConfig) -> Any:
        """AirRep's training queries (a ``datasets.Dataset`` with ids), disjoint from the training
        set and the evaluation queries; ``score.options.queries`` of them."""
        raise ConfigError(f"the {getattr(self, 'name', '?')!r} family provides no AirRep training queries")

    def provenance(self, cfg: RunConfig, role: str, paths: RunPaths | None = None) -> list[str]:
        """Keys naming where each example of ``role`` (``"train"``, ``"query"``, ``"airrep"``) comes
        from; equal keys are the same underlying example (:func:`tda.scorers.airrep.head.check_disjoint`).
        Default: ``<data.name>/<split>/<id>`` with ids as positions in the split."""
        d = cfg.data
        if role not in ("train", "query", "airrep"):
            raise ConfigError(f"provenance role {role!r} is unknown; use 'train', 'query' or 'airrep'")
        if role == "airrep":
            return [f"{d.name}/train/{i}" for i in example_ids(self.airrep_queries(cfg))]
        split = "train" if role == "train" else d.query_split
        return [f"{d.name}/{split}/{i}" for i in example_ids(self.datasets(cfg, paths)[role])]


class Reporting:
    """Capability: the family's own report text, rendered from stored results (never computed)."""

    def report(self, cfg: RunConfig, paths: RunPaths) -> str | None:
        return None


# ------------------------------------------------------------------ shared helpers
@contextmanager
def featurize_params_named() -> Iterator[None]:
    """Prefix the factored projection's layer-selection errors with the config key that sets it."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"featurize.params: {exc}") from exc


def projection_of_spec(spec: Any) -> str | None:
    """The projection a featurizer spec (a feature manifest's ``spec``) was made with, if it says."""
    if not isinstance(spec, dict):
        return None
    if spec.get("projection") in SPECS:  # the featurizers of captured layers (and plug-ins) record it
        return spec["projection"]
    backend = spec.get("backend")
    return None if not isinstance(backend, str) else "sparse" if backend == "sparse" else "dense"


def recorded_projection(paths: RunPaths | None) -> str | None:
    """The projection of a run's stored training features (old runs keep theirs), if any."""
    return None if paths is None else projection_of_spec(json_field(paths.store("train") / "manifest.json", "spec"))


def resolved_projection(cfg: RunConfig, paths: RunPaths | None = None, model: nn.Module | None = None) -> str:
    """``featurize.projection`` with ``auto`` resolved: what the run's training features were made
    with when they exist, else :func:`tda.featurizers.choice.structural_choice` of ``model`` (the
    featurize stage decides first with :meth:`Family.auto_projection`, which also checks the
    captures on a batch); ``"auto"`` when neither is known."""
    f = cfg.featurize
    if f.projection != "auto":
        return f.projection
    if f.params is not None:
        return FALLBACK
    recorded = recorded_projection(paths)
    if recorded is not None:
        return recorded
    return structural_choice(model).projection if model is not None else "auto"


def decide_projection(cfg: RunConfig, paths: RunPaths, family: Family, train: Any) -> ProjectionChoice:
    """The projection the featurize stage uses, and why (``auto``: recorded, else decided now)."""
    f = cfg.featurize
    if f.projection != "auto":
        return ProjectionChoice(f.projection, "featurize.projection")
    recorded = recorded_projection(paths)
    if recorded is not None:
        return ProjectionChoice(recorded, "the projection of the stored training features")
    return family.auto_projection(cfg, paths, train)


def gradient_featurizer(cfg: RunConfig, model: nn.Module, task: Task, paths: RunPaths | None = None) -> Any:
    """Projected per-example gradients of ``task`` under ``featurize`` (dense, sparse, factored or
    tensorsketch; ``auto``: :func:`resolved_projection`)."""
    f, projection = cfg.featurize, resolved_projection(cfg, paths, model)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if _width_is_k(projection) and f.k > d:
        raise ConfigError(f"featurize.k is {f.k:,} but the model has only {d:,} trainable parameters to project; "
                          f"choose featurize.k <= {d:,} (a few thousand at most is usual)")
    spec = projection_spec(projection, **featurize_settings(cfg))
    with featurize_params_named():
        return make_featurizer(spec, model, task, param_names=f.params, device=resolve_device(f.device))


def _width_is_k(projection: str) -> bool:
    """Is a projection's feature width ``featurize.k`` (``auto``: yes, it resolves to one that is)?"""
    return projection == "auto" or SPECS[projection].width_is_k


def featurize_settings(cfg: RunConfig) -> dict[str, Any]:
    """``featurize``'s projection settings under the names :func:`tda.featurizers.spec.projection_spec`
    takes (each projection keeps its own)."""
    return projection_settings(cfg.featurize)


def projection_width(cfg: RunConfig, model: nn.Module) -> int:
    """Width of one projected gradient: ``featurize.k`` (dense, sparse, tensorsketch) or the
    factored projection's ``sum over layers of k_out * k_in`` for ``model``."""
    f = cfg.featurize
    if _width_is_k(f.projection):  # auto resolves to a projection of width k
        return f.k
    with featurize_params_named():
        return projection_spec(f.projection, **featurize_settings(cfg)).width(model, f.params)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("featurize.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def held_datasets(load: Callable[..., dict[str, Any]], owner: type) -> Callable[..., dict[str, Any]]:
    """``load`` (a family's ``datasets``) read once per command and configuration, again when
    asked for another run folder (or none) or a file of :meth:`Family.data_files` changed
    (:func:`pipelines.held.held`); each call returns its own dict of the data sets (a caller may
    replace an entry)."""
    @functools.wraps(load)
    def datasets(self: Family, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        key = ("datasets", owner.__module__, owner.__qualname__, config_key(cfg))
        return dict(held(key, lambda: self.data_files(cfg, paths), lambda: load(self, cfg, paths), paths))
    return datasets


def collated(dataset: Any, collate: Callable) -> dict[str, torch.Tensor]:
    """The whole dataset collated at once (small demo sets)."""
    return collate(arrow_columns(dataset.with_format("arrow")[:]))
