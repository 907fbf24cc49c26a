"""``score.options``: the settings of the representation scorers and TRAK's answer options,
checked like the rest.

Only ``repsim``, ``airrep`` and ``trak`` take options; any other scorer with a non-empty
``score.options`` is an error, and unknown keys raise :class:`ConfigError` with a "did you
mean". Options change scores only, so they are hashed with the score section (index and scores
are refitted when they change); the representation module also changes the stored features and
goes into the feature fingerprint through :meth:`pipelines.families.base.Family.feature_tag`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tda.scorers.airrep.head import HeadConfig
from tda.errors import ConfigError
from tda.scorers.repsim import METRICS

from pipelines.spec.method import find_method, option_types
from pipelines.spec.schema import _build

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig


@dataclass
class RepSimOptions:
    """``score.options`` of ``repsim`` (docs/methods.md section 5)."""

    module: str | None = None  # module whose output is h(z) (None: the family's default)
    label_aware: bool = False  # classifier: features (onehot(y) - softmax(logits)) x h instead of h
    metric: str = "cosine"  # "cosine" or "dot"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"score.options.metric is {self.metric!r}; choose one of {METRICS}")


@dataclass
class AirRepOptions:
    """``score.options`` of ``airrep``: supervision budget and the encoder head (tda/scorers/airrep/head.py)."""

    module: str | None = None  # module whose output is h(z) (None: the family's default)
    label_aware: bool | None = None  # (onehot(y) - softmax(logits)) x h; None: yes where the family has labels
    queries: int | None = None  # training queries, disjoint from training set and evaluation queries (None: family default)
    subsets: int | None = None  # random training subsets, one retraining each (None: family default)
    alpha: float = 0.5  # subset size as a fraction of the training set
    subset_epochs: int | None = None  # epochs of each subset model (None: the family's share of train.epochs)
    seed: int = 0  # subsets, retraining seeds, head initialisation
    data_dir: str | None = None  # retraining results (default <out_dir>/airrep); share it across runs
    width: int = 64  # embedding width D
    hidden: int = 0  # head MLP hidden width (0: a linear head)
    steps: int = 300  # head training steps (Adam)
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pooling: str = "sum"  # group score: "sum" or "attention" (AirRep's softmax over |<e_q, e_i>|)
    temperature: float = 1.0  # attention softmax temperature
    center: bool = False  # subtract each retraining's mean output over the queries (shared noise)
    val_fraction: float = 0.2  # training queries and subsets held out to choose the best head step

    def __post_init__(self) -> None:
        for name, least in (("queries", 1), ("subsets", 2), ("subset_epochs", 1)):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise ConfigError(f"score.options.{name} must be >= {least}, got {getattr(self, name)}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"score.options.alpha must be in (0, 1), got {self.alpha}")
        self.head_config()  # checks the head settings

    def head_config(self) -> HeadConfig:
        return HeadConfig(width=self.width, hidden=self.hidden, steps=self.steps, lr=self.lr,
                          weight_decay=self.weight_decay, pooling=self.pooling, temperature=self.temperature,
                          center=self.center, val_fraction=self.val_fraction, seed=self.seed)

    def resolved(self, cfg: RunConfig, family: Any) -> "AirRepOptions":
        """Unset keys filled in by the family: ``queries``, ``subsets`` and ``subset_epochs =
        ceil(share * train.epochs)`` from its ``airrep_budget``
        (:class:`~pipelines.families.base.Retraining`); ``label_aware`` where the family has class
        labels (its ``label_key``)."""
        queries, subsets, share = getattr(family, "airrep_budget", (256, 32, 0.5))
        label_aware = family.label_key is not None if self.label_aware is None else self.label_aware
        return replace(self, queries=self.queries or queries, subsets=self.subsets or subsets, label_aware=label_aware,
                       subset_epochs=self.subset_epochs or max(1, math.ceil(share * cfg.train.epochs)))


@dataclass
class TRAKOptions:
    """``score.options`` of ``trak`` (:class:`tda.scorers.trak_variants.TRAKVariantScorer`):
    ``normalize: true`` scores by the cosine of the whitened gradients (TrackStar's unit
    normalisation; proponents that differ per query and include well-fitted odd examples, at some
    LDS, ``benchmarks/quanda.py``); ``q_weight: false`` drops the ``1 - p`` weight only."""

    normalize: bool = False
    q_weight: bool = True

    def __post_init__(self) -> None:
        for name in ("normalize", "q_weight"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"score.options.{name} must be true or false, got {getattr(self, name)!r}")


def __getattr__(name: str) -> Any:
    """``OPTION_TYPES``: scorer -> its options type, as the methods declare them (``Method.options``)."""
    if name == "OPTION_TYPES":
        return option_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def score_options(cfg: RunConfig, family: Any) -> Any:
    """``score.options`` parsed for ``score.scorer`` (``None`` for scorers without options), with
    AirRep's unset budget filled in by ``family`` (the run's model family).

    Raises:
        ConfigError: options given to a scorer that takes none, or an unknown / bad key.
    """
    method = find_method(cfg.score.scorer)
    kind = method.options_type if method is not None else None
    if kind is None:
        if cfg.score.options:
            raise ConfigError(f"score.options are settings of {sorted(option_types())}; score.scorer "
                              f"{cfg.score.scorer!r} takes none, got {sorted(cfg.score.options)}")
        return None
    options = _build(kind, cfg.score.options, "score.options")
    return options.resolved(cfg, family) if isinstance(options, AirRepOptions) else options


__all__ = ["AirRepOptions", "OPTION_TYPES", "RepSimOptions", "TRAKOptions", "score_options"]
