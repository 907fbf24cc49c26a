"""The typed run configuration: one dataclass per section.

Every section is a dataclass with checks in ``__post_init__``; unknown keys raise
:class:`ConfigError` with a "did you mean" suggestion.
:func:`pipelines.spec.fingerprints.section_fingerprint` hashes the resolved sections an artifact
depends on, so features are reused when only scoring settings
change and refused when the projection or data change. Reading YAML, resolving paths and the
checks that need the model family live in :mod:`pipelines.config` (this module imports no family).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from stores.digests import content_digest
from tda.errors import ConfigError
from tda.featurizers.spec import SPECS
from tda.scorers.trak import check_lambda_rel

from pipelines.spec.checks import _choice, _key, _positive  # noqa: F401  (re-exported)
from pipelines.spec.workflows import PROTOCOLS, CurateConfig, UnlearnConfig, ValidateConfig  # noqa: F401


@dataclass
class DataConfig:
    """Data: a named demo data set (``name``, files under ``root``) or the user's own files
    (``train_path`` / ``query_path``). Subsets of ``train_size`` / ``query_size`` rows are drawn at
    random with ``seed``, stratified by label where there is one (see :mod:`tda.data.loading`)."""

    name: str = "mnist"  # demo data set the family reads ("mnist", "fashion-mnist", "cifar2", ...)
    root: str | None = None  # folder of the demo data set's files (None: the copy shipped with tda, where there is one)
    train_size: int | None = 10000  # N training examples drawn at random, stratified by label (None: all)
    query_split: str = "test"  # split the queries come from
    query_size: int | None = 500  # N examples of the query split drawn at random, stratified by label (None: all)
    query_path: str | None = None  # queries from a file instead: .parquet, .arrow, .csv, .json/.jsonl or a save_to_disk folder
    train_path: str | None = None  # your training set: .parquet, .arrow, .csv, .json/.jsonl or a save_to_disk folder
    collate: str | None = None  # "module:fn" or "file.py:fn" turning a dict of columns into tensors (None: built in)
    text_column: str = "text"  # column names the built-in collates read
    label_column: str = "label"
    image_column: str = "image"
    image_layout: str = "auto"  # stored image layout: "auto" (inferred; error when ambiguous), "HWC", "CHW" (both fed as NCHW) or "stored" (fed as stored)
    image_scale: float | str = "auto"  # images are divided by this: "auto" (255 for integer pixels, 1 for floats), a number, or "none"
    class_names: list[str] | None = None  # names of the classes 0..C-1 (default: the label column's ClassLabel names, or the model's id2label)
    tokenizer: str | None = None  # Hugging Face tokenizer folder (default: the model.hf folder)
    max_length: int = 128  # tokens per text example (built-in text collate)
    seed: int = 0  # seed of the random train_size / query_size subsets
    subset: str = "random"  # "random" (seeded, stratified) or "first" (the first N rows, as before 0.2)
    label_noise: float = 0.0  # share of training labels flipped to another class (seeded by data.seed; curation checks)

    def __post_init__(self) -> None:
        _choice(self, "query_split", ("train", "test"))
        _choice(self, "subset", ("random", "first"))
        _choice(self, "image_layout", ("auto", "HWC", "CHW", "stored"))
        if isinstance(self.image_scale, str) and self.image_scale not in ("auto", "none"):
            raise ConfigError(f"data.image_scale must be a number, 'auto' or 'none', got {self.image_scale!r}")
        if not isinstance(self.image_scale, str) and not self.image_scale > 0:
            raise ConfigError(f"data.image_scale must be > 0, got {self.image_scale}")
        _positive(self, "train_size", "query_size", "max_length")
        if not 0 <= self.label_noise < 1:
            raise ConfigError(f"data.label_noise must be in [0, 1), got {self.label_noise}")


@dataclass
class ModelConfig:
    """Model: its family (pipelines/families/), architecture and family-specific options."""

    family: str = "classifier"  # classifier, diffusion, causal-lm, user (model.factory), hf (model.hf)
    arch: str = "mlp"  # classifier: "mlp" or "cnn"; diffusion: "unet"; causal-lm: "gpt2"
    hidden: list[int] = field(default_factory=lambda: [128])  # MLP widths / CNN or UNet channels per level
    options: dict[str, Any] = field(default_factory=dict)  # family options (user family: factory keyword arguments)
    factory: str | None = None  # your model: "module:callable" or "path/file.py:callable", called with **options
    hf: str | None = None  # a Hugging Face save_pretrained folder (family hf)
    hf_class: str | None = None  # transformers class name overriding the folder's config "architectures"
    checkpoints: list[str] | None = None  # state_dict files (.pt / .safetensors) or globs trained elsewhere: no training
    task: str | None = None  # classification | causal-lm | diffusion | "module:Class" (default: the family's)
    check_trained: bool = True  # refuse checkpoints near chance on a training sample (likely an input mismatch); false for untrained ones

    def __post_init__(self) -> None:
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ConfigError(f"model.hidden must be a non-empty list of positive widths, got {self.hidden}")
        if self.family == "classifier" and (self.factory or self.hf):
            self.family = "hf" if self.hf else "user"  # the family follows from what names the model
        if self.checkpoints is not None and not self.checkpoints:
            raise ConfigError("model.checkpoints is an empty list; name at least one state_dict file, or remove "
                              "the key to train the models in the run")


@dataclass
class TrainConfig:
    """Training of the models whose checkpoints are attributed."""

    models: int = 3  # independently trained models (seeds seed, seed+1, ...)
    epochs: int = 4
    lr: float = 0.05
    batch_size: int = 128
    seed: int = 0
    checkpoints: str = "final"  # "final": last epoch of each model; "all": every epoch
    factory: str | None = None  # your own retraining loop: "module:fn", fn(model, dataset, seed) -> state_dict (else the generic recipe)
    # The generic recipe (tda/workflows/recipe.py) that retrains a user's or Hugging Face model for validate, curate, unlearn and
    # AirRep; None: the value recorded with the checkpoints (tda.CheckpointRecorder / CheckpointCallback), else the default.
    optimizer: str | None = None  # "sgd" (default), "adam" or "adamw"
    momentum: float | None = None  # SGD momentum (default 0.9)
    weight_decay: float | None = None  # default 5e-4
    schedule: str | None = None  # "linear" (to 0 over all steps; default), "constant", "cosine" or "epoch-linear"
    warmup_steps: int | None = None  # linear warm-up steps (default 0)
    init: str = "auto"  # "scratch" (fresh seeded initialisation), "pretrained" (fine-tune from the weights the model is built with), "auto" (hf: pretrained; else scratch)

    def __post_init__(self) -> None:
        _positive(self, "models", "epochs", "batch_size")
        _choice(self, "checkpoints", ("final", "all"))
        _choice(self, "init", ("auto", "scratch", "pretrained"))
        if self.optimizer is not None:
            _choice(self, "optimizer", ("sgd", "adam", "adamw"))
        if self.schedule is not None:
            _choice(self, "schedule", ("constant", "linear", "cosine", "epoch-linear"))
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")


@dataclass
class FeaturizeConfig:
    """Per-example gradients and their random projection.

    ``projection: auto`` (the default) is ``tensorsketch`` for any model it covers whose captures
    match autograd on a training batch (LDS within 0.011 of dense at equal k on the MNIST MLP,
    CIFAR-2 CNN and char LM, and the fastest; ``benchmarks/projections.py``), else ``sparse``
    (tda.featurizers.choice; pipelines.families.base.decide_projection; a ``params`` selection
    and the diffusion family keep ``sparse``). ``sparse`` projects the flat
    per-example gradient with an SJLT of ``nonzeros`` entries per coordinate (tda.projections.sparse);
    ``dense`` with a d x k matrix;
    ``tensorsketch`` sketches each covered layer's gradient (nn.Linear, Conv1D, Conv2d with
    groups=1, embeddings and a tied LM head, LayerNorm / RMSNorm / GroupNorm / eval BatchNorm)
    into the same ``k`` outputs from the layer's inputs and output gradients without forming it
    (TensorSketch, tda.projections.tensorsketch; width ``k``, ``params`` names modules; any other trainable
    parameter under ``params`` is a ConfigError, tda.projections.sketch_layers);
    ``factored`` projects each supported layer's gradient (nn.Linear, Conv1D, Conv2d with
    groups=1) with a Kronecker pair ``k_out x k_in`` without forming it (LoGra, tda.featurizers.factored):
    the feature width is then ``sum over layers of k_out * k_in`` (``k`` and ``backend`` are
    unused), ``params`` names modules (or prefixes) instead of parameters, and parameters of
    other layers (norms, embeddings) are skipped and listed in the store manifest. A setting the
    chosen projection ignores (``k_in`` / ``k_out`` for dense, ``projector`` for sparse, ...) is
    not in the fingerprint, so changing it reuses the stored features (run folders made before
    fingerprint scheme 2 still count it: :data:`pipelines.layout.FINGERPRINT_VERSION`).
    """

    k: int = 1024  # projection dimension
    projector: str = "rademacher"  # or "gaussian"
    seed: int = 0  # projection seed
    batch_size: int = 256  # examples per gradient batch
    shard_size: int = 4096  # examples per store shard (unit of resumption)
    dtype: str = "float32"  # stored dtype: float32 or float16
    params: list[str] | None = None  # parameter (dense, sparse) / module (factored, tensorsketch) names or prefixes (None: all)
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda"
    backend: str = "auto"  # projector backend: auto/dense/fast_jl
    projection: str = "auto"  # "auto" (tensorsketch where it covers the model, checked on a batch, else sparse; docs/projections.md), "sparse" (SJLT, s nonzeros per coordinate), "dense" (P^T g), "tensorsketch" (per-layer TensorSketch into k) or "factored" (per-layer Kronecker)
    nonzeros: int = 1  # sparse: nonzeros per gradient coordinate (s; k must be a multiple of it)
    k_in: int | None = 16  # factored: projected layer-input dimension per layer (None: identity)
    k_out: int | None = 16  # factored: projected output-gradient dimension per layer (None: identity)

    def __post_init__(self) -> None:
        _positive(self, "k", "batch_size", "shard_size", "k_in", "k_out", "nonzeros")
        _choice(self, "projector", ("rademacher", "gaussian"))
        _choice(self, "dtype", ("float32", "float16"))
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "backend", ("auto", "dense", "fast_jl"))
        _choice(self, "projection", ("auto", *SPECS))  # the registered projections (tda.featurizers.spec)
        if self.projection in ("sparse", "auto") and self.k % self.nonzeros:
            raise ConfigError(f"featurize.k ({self.k}) must be a multiple of featurize.nonzeros ({self.nonzeros}) "
                              "for the sparse projection; change one of them")
        if self.seed < 0:
            raise ConfigError(f"featurize.seed must be >= 0, got {self.seed}")


@dataclass
class ScoreConfig:
    """Scoring and what the report prints."""

    scorer: str = "trak"  # the family lists its scorers (every family: trak/dtrak, tracin, graddot, gradcos, repsim, airrep)
    lambda_rel: float | str = "auto"  # TRAK ridge: "auto" (from each kernel's spectrum) or a value relative to mean diag(Phi^T Phi)
    topk: int = 10  # proponents/opponents kept per query
    show: int = 3  # queries printed in the report
    block_rows: int = 8192  # training rows per scoring block
    influential_fraction: float = 0.2  # report: "generally influential" = in the top-k of more than this share of queries
    dense: bool = True  # write the dense (n_query x n_train) scores.npy; false: top-k from the index only (large n)
    options: dict[str, Any] = field(default_factory=dict)  # repsim / airrep / trak settings (pipelines/spec/options.py)
    text_chars: int | None = None  # texts shown in full (CLI, JSON, HTML) unless cut to this many characters

    def __post_init__(self) -> None:
        _positive(self, "topk", "block_rows", "text_chars")
        if self.show < 0:
            raise ConfigError(f"score.show must be >= 0, got {self.show}")
        try:
            self.lambda_rel = check_lambda_rel(self.lambda_rel)
        except ConfigError as exc:
            raise ConfigError(f"score.{exc}") from None
        if not 0 <= self.influential_fraction < 1:
            raise ConfigError(f"score.influential_fraction must be in [0, 1), got {self.influential_fraction}")


@dataclass
class IndexConfig:
    """FAISS index over train-side vectors."""

    kind: str = "flat"  # "flat" / "pruned" (exact; pruned skips short vectors), "ivf" / "hnsw" (approximate)
    nlist: int | None = None  # IVF cells (default ~4 sqrt(n))
    nprobe: int | None = None  # IVF cells searched per query (default nlist / 32, at least 16)
    hnsw_m: int = 16  # HNSW links per node
    ef_construction: int = 64  # HNSW candidates per insertion while building
    ef_search: int = 128  # HNSW candidates per search (raise for recall)
    recall_queries: int = 100  # the run's queries the approximate index is checked on (0: no check)

    def __post_init__(self) -> None:
        _choice(self, "kind", ("flat", "pruned", "ivf", "hnsw"))
        _positive(self, "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search")
        if self.recall_queries < 0:
            raise ConfigError(f"index.recall_queries must be >= 0, got {self.recall_queries}")


@dataclass
class ExecutorConfig:
    """Where independent jobs run: featurize shards (checkpoint x partition) and retrainings."""

    kind: str = "local"  # "local" (in process) or "dask"
    address: str | None = None  # dask scheduler, e.g. tcp://10.0.0.5:8786; None starts a LocalCluster
    workers: int = 2  # LocalCluster worker processes

    def __post_init__(self) -> None:
        _choice(self, "kind", ("local", "dask"))
        _positive(self, "workers")


@dataclass
class RunConfig:
    """A whole run: the sections above plus where outputs go."""

    name: str = "run"
    out_dir: str = "runs/default"  # outputs (checkpoints, stores, index, scores)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    code_dir: str | None = None  # folder added to sys.path for "module:fn" strings (the config file's folder)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # e.g. float | str: a number if it reads as one
            try:
                return _coerce(value, alternative, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[]") for v in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, values: Any, where: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {known}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


#: Keys added after the first release, hashed only when set away from these defaults, so that
#: fingerprints (and with them existing run folders) of configs that do not use them are unchanged.
LATER_KEYS = {("model", "family"): ModelConfig().family, ("data", "query_path"): None, ("model", "options"): {},
              ("score", "influential_fraction"): ScoreConfig().influential_fraction, ("score", "dense"): True,
              ("score", "options"): {}, ("score", "text_chars"): None, ("featurize", "projection"): "dense",  # the default before the sparse one: runs made then stay valid
              ("featurize", "k_in"): FeaturizeConfig().k_in, ("featurize", "k_out"): FeaturizeConfig().k_out,
              ("featurize", "nonzeros"): FeaturizeConfig().nonzeros,
              **{("data", k): getattr(DataConfig(), k) for k in ("train_path", "collate", "text_column", "label_column",
                                                                  "image_column", "tokenizer", "max_length",
                                                                  "image_layout", "image_scale")},
              **{("model", k): None for k in ("factory", "hf", "hf_class", "checkpoints", "task")},
              ("train", "factory"): None, ("data", "label_noise"): 0.0, ("train", "init"): "auto",
              **{("train", k): None for k in ("optimizer", "momentum", "weight_decay", "schedule", "warmup_steps")},
              **{("index", k): getattr(IndexConfig(), k) for k in ("hnsw_m", "ef_construction", "ef_search")},
              ("index", "recall_queries"): IndexConfig().recall_queries}

#: Keys no fingerprint holds: where code is imported from does not change what it computes.
UNHASHED_KEYS = ("code_dir",)
#: Keys that change only how answers are shown, never what is computed.
UNHASHED_SECTION_KEYS = (("data", "class_names"), ("model", "check_trained"))


#: Data keys that choose the queries: the training side (checkpoints, train features, fitted
#: scorer, index) does not depend on them, so changing the queries reuses all of it.
QUERY_KEYS = ("query_split", "query_size", "query_path")


#: ``(section, key)`` of the keys naming input data (files or folders; ``model.checkpoints`` a
#: list): fingerprints hold the content digest of what they name, never the path.
INPUT_KEYS = (("data", "root"), ("data", "train_path"), ("data", "query_path"), ("data", "tokenizer"),
              ("model", "hf"), ("model", "checkpoints"))
#: Import strings; a ``path/file.py:fn`` one is hashed as ``file.py:fn`` (where code lives is not what it computes).
IMPORT_KEYS = (("model", "factory"), ("model", "task"), ("data", "collate"), ("train", "factory"))


def input_digests(cfg: RunConfig) -> dict[str, Any]:
    """``{"section.key": digest}`` of every :data:`INPUT_KEYS` value that is set (a list of digests
    for ``model.checkpoints``; a value naming no existing path is kept as it is)."""
    out: dict[str, Any] = {}
    for section, key in INPUT_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        digests = [content_digest(v) or v for v in values]
        out[f"{section}.{key}"] = digests if isinstance(value, list) else digests[0]
    return out
