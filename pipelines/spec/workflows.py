"""Configuration sections of the workflows that run after ``tda run``: ``tda validate`` and ``tda curate``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tda.errors import ConfigError

from pipelines.spec.method import self_influence_methods
from pipelines.spec.checks import _positive


#: LDS protocols of ``tda validate`` (:mod:`pipelines.ground_truth`)
PROTOCOLS = ("classic", "small-drop")


@dataclass
class ValidateConfig:
    """Counterfactual validation (docs/methods.md section 6)."""

    protocol: str = "classic"  # "classic" (random alpha-subsets, fresh seeds) or "small-drop" (the run's seed, drop a few)
    subsets: int = 100  # J random training subsets
    alpha: float = 0.5  # classic: subset size as a fraction of the training set
    drop_fraction: float = 0.01  # small-drop: share of the training set each subset drops
    scorers: list[str] | None = None  # scorers measured (None: every scorer that reads the run's features)
    models_per_subset: int = 1  # R retrainings per subset (outputs averaged)
    seed: int = 0  # subset and retraining seeds derive from it
    queries: int | None = None  # first N queries validated (None: all)
    ground_truth_dir: str | None = None  # default <out_dir>/ground-truth; share it across runs
    tune_fraction: float = 0.5  # share of queries and subsets used to choose lambda
    lambda_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0])
    removal_queries: int = 0  # queries with removal curves (0: off)
    removal_ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    removal_seeds: int = 1  # retrainings per removal set
    linearity_subsets: int = 5  # MAGIC validated under small-drop: subsets retrained again at half weight (0: off)
    plots: bool = True  # write PNG plots next to the JSON/CSV

    def __post_init__(self) -> None:
        _positive(self, "subsets", "models_per_subset", "queries", "removal_seeds")
        if not 0 < self.alpha < 1 or not 0 < self.tune_fraction < 1:
            raise ConfigError("validate.alpha and validate.tune_fraction must be in (0, 1)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"validate.protocol is {self.protocol!r}; use 'classic' or 'small-drop'")
        if not 0 < self.drop_fraction < 0.5:
            raise ConfigError(f"validate.drop_fraction must be in (0, 0.5), got {self.drop_fraction}")
        if self.scorers is not None and not self.scorers:
            raise ConfigError("validate.scorers must name at least one scorer, or be left out (every scorer)")
        if not self.lambda_grid or any(not x > 0 for x in self.lambda_grid):
            raise ConfigError(f"validate.lambda_grid must hold positive values, got {self.lambda_grid}")
        if not isinstance(self.linearity_subsets, int) or self.linearity_subsets < 0:
            raise ConfigError(f"validate.linearity_subsets must be an integer >= 0, got {self.linearity_subsets!r}")
        if self.removal_queries < 0 or any(k < 1 for k in self.removal_ks):
            raise ConfigError("validate.removal_queries must be >= 0 and removal_ks positive")


#: suspect rankings ``tda curate`` can compute (:mod:`pipelines.workflows.curate`): self-influence under a
#: gradient scorer (the methods declaring ``self_influence``), training loss, 1 - p(label)
#: (``confidence``), and a rank ensemble
CURATION_BASELINES = ("loss", "confidence")
#: rank ensembles and the rankings they average
CURATION_ENSEMBLES = {"trak+loss": ("trak", "loss"), "trak+loss+confidence": ("trak", "loss", "confidence")}


def curation_methods() -> tuple[str, ...]:
    """Every ranking ``curate.method(s)`` may name: self-influence methods, baselines, ensembles."""
    return (*self_influence_methods(), *CURATION_BASELINES, *CURATION_ENSEMBLES)


@dataclass
class CurateConfig:
    """Data curation (``tda curate``): rank training examples as suspected mislabelled or outlying."""

    method: str = "trak+loss+confidence"  # the ranking flagged and retrained without (every method is reported)
    methods: list[str] | None = None  # rankings computed (None: every one the run's features allow)
    remove_fraction: float = 0.1  # the check: retrain without the top share flagged, and without a random share
    retrain_seeds: int = 3  # R retrainings per arm of the check (0: no check)
    seed: int = 0  # the random arm's draw and the retraining seeds derive from it
    self_influence: str = "loss"  # of the training loss's gradient Q grad f ("loss") or of the output f ("output")

    def __post_init__(self) -> None:
        if self.self_influence not in ("loss", "output"):
            raise ConfigError(f"curate.self_influence is {self.self_influence!r}; choose 'loss' (the gradient of "
                              "the training loss, the default) or 'output' (of the measured output f)")
        known = curation_methods()
        if self.method not in known:
            raise ConfigError(f"curate.method is {self.method!r}; choose one of {known}")
        bad = [m for m in self.methods or [] if m not in known]
        if bad or self.methods == []:
            raise ConfigError(f"curate.methods names {bad or 'nothing'}; choose from {known} (or leave it out)")
        if not 0 < self.remove_fraction < 1:
            raise ConfigError(f"curate.remove_fraction must be in (0, 1), got {self.remove_fraction}")
        if self.retrain_seeds < 0:
            raise ConfigError(f"curate.retrain_seeds must be >= 0, got {self.retrain_seeds}")


@dataclass
class UnlearnConfig:
    """Unlearning (``tda unlearn``): a behaviour (a group of queries), its forget set, the check."""

    queries: list[int] | None = None  # query ids of the behaviour to remove (None: the queries of query_class)
    query_class: int | None = None  # the behaviour is this class's queries (None: the first query's class)
    k: int | None = None  # forget-set size (None: the smallest reaching target_change, else 2% of the training set)
    target_change: float | None = None  # wanted predicted change of the group's summed output (negative: lower it)
    retrain_seeds: int = 3  # R retrainings per arm (forget set, random control, full data; 0: no check)
    seed: int = 0  # the control's draw and the retraining seeds derive from it
    approximate: bool = True  # also unlearn without retraining: gradient difference, unrestricted and masked
    approx_steps: int = 20  # full-batch gradient-difference steps
    approx_lr: float | None = None  # their learning rate (None: train.lr)
    mask_fraction: float = 0.1  # share of weights the masked variant moves (most attributed to the forget loss)

    def __post_init__(self) -> None:
        _positive(self, "k", "approx_steps")
        if not 0 < self.mask_fraction <= 1 or (self.approx_lr is not None and not self.approx_lr > 0):
            raise ConfigError("unlearn.mask_fraction must be in (0, 1] and unlearn.approx_lr positive")
        if self.queries is not None and not self.queries:
            raise ConfigError("unlearn.queries must name at least one query id, or be left out")
        if self.retrain_seeds < 0:
            raise ConfigError(f"unlearn.retrain_seeds must be >= 0, got {self.retrain_seeds}")
        if self.target_change is not None and self.target_change == 0:
            raise ConfigError("unlearn.target_change must be non-zero (negative lowers the group's output)")
