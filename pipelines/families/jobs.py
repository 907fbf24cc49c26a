"""The base of every family's subset retraining job: LDS ground truth and AirRep supervision.

A job is a picklable :class:`~pipelines.ground_truth.RetrainJob`, ``(training rows, seed) ->
(m,) outputs``: it trains the family's recipe from scratch on the given rows of the run's
training set and returns the measured output f (docs/methods.md section 1) of every query. Each
family's job lives in the family's own file (``ClassifierSubsetJob`` in :mod:`.classifier`,
``LMSubsetJob`` in :mod:`.causal_lm`, ``DiffusionSubsetJob`` in :mod:`.diffusion`,
``UserSubsetJob`` in :mod:`.user`).

``queries`` picks the query set: ``"query"`` (the run's evaluation queries; the diffusion
family's generated images need the run folder and are left out) or ``"airrep"`` (the AirRep
training queries, :meth:`pipelines.families.base.Retraining.airrep_queries`). ``epochs`` overrides
``train.epochs`` (AirRep's subset models may train for fewer epochs than the attributed model).
Workers rebuild data from the config (cached per process); nothing large goes through the
executor's task graph.

``weighted`` (the fixed-seed small-drop protocol): the job trains on every row with data weight 1
on the given rows and 0 on the rest, so the batches, their order and the initialisation stay the
full run's. Jobs whose recipe takes weights say so (``supports_weights``, :meth:`SubsetJob.run_weighted`);
the others train on the given rows with the same seed (the batch order then differs), and
:attr:`SubsetJob.batch_order` records which of the two happened. ``dropped_weight`` (default 0)
is the weight the rows left out get in a weighted job: ``tda validate``'s linearity check
retrains a few subsets with it at 0.5 (:mod:`pipelines.stages.validate_linearity`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from stores._io import fingerprint
from tda.data.loading import example_ids
from tda.errors import ConfigError

from pipelines.families.base import collated
from pipelines.families.registry import family_for

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig

QUERY_SETS = ("query", "airrep")
_DATA: dict[str, tuple[dict, np.ndarray, dict, np.ndarray]] = {}


def job_data(cfg: RunConfig, queries: str) -> tuple[dict, np.ndarray, dict, np.ndarray]:
    """``(train batch, train ids, query batch, query ids)`` collated whole with the family's collate,
    cached per process by the sections they depend on."""
    d = cfg.to_dict()
    key = fingerprint({"data": d["data"], "model": d["model"], "score": d["score"], "queries": queries})
    if key not in _DATA:
        family = family_for(cfg)
        data = family.datasets(cfg)
        query = data["query"] if queries == "query" else family.airrep_queries(cfg)
        collate = family.collate(cfg)
        _DATA[key] = (collated(data["train"], collate), example_ids(data["train"]),
                      collated(query, collate), example_ids(query))
    return _DATA[key]


def take_rows(batch: dict[str, torch.Tensor], rows: np.ndarray | slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


class SubsetJob:
    """Base of the family jobs: loads the data, then :meth:`run` trains and measures.

    Args:
        cfg: the run's configuration (its family, data and training recipe).
        queries: ``"query"`` or ``"airrep"`` (module docstring).
        n_queries: measure only the first N queries (None: all).
        epochs: training epochs (None: ``train.epochs``).
    """

    def __init__(self, cfg: RunConfig, queries: str = "query", n_queries: int | None = None,
                 epochs: int | None = None) -> None:
        if queries not in QUERY_SETS:
            raise ConfigError(f"subset job queries {queries!r} is unknown; use one of {QUERY_SETS}")
        self.cfg, self.queries, self.n_queries = cfg, queries, n_queries
        self.epochs = epochs or cfg.train.epochs
        self.weighted = False

    supports_weights = False
    dropped_weight = 0.0  # weight of the rows left out under the fixed batch order (0: dropped)

    @property
    def batch_order(self) -> str:
        """``"fixed"`` (zero weights keep the full run's batches) or ``"reshuffled"`` (subset rows)."""
        return "fixed" if self.weighted and self.supports_weights else "reshuffled"

    def available_queries(self) -> int:
        """How many queries the job can measure (the diffusion family's generated ones are left out)."""
        return len(job_data(self.cfg, self.queries)[3])

    def __call__(self, task: tuple[np.ndarray, int]) -> np.ndarray:
        rows, seed = task
        torch.set_num_threads(1)
        train, train_ids, query, query_ids = job_data(self.cfg, self.queries)
        keep = slice(0, self.n_queries)
        rows = np.asarray(rows, dtype=np.int64)
        query, query_ids = take_rows(query, keep), query_ids[keep]
        if self.dropped_weight and self.batch_order != "fixed":
            raise ConfigError(f"a dropped-row weight of {self.dropped_weight:g} needs a job that trains with data "
                              f"weights under the small-drop protocol; the {self.cfg.model.family!r} family's job "
                              "does not")
        if self.batch_order == "fixed":
            weights = torch.full((len(train_ids),), float(self.dropped_weight))
            weights[torch.from_numpy(rows)] = 1.0
            if bool((weights == 1.0).all()):  # the full-set reference: the attributed run's own path, bit for bit
                weights = None
            out = self.run_weighted(train, train_ids, query, query_ids, int(seed), weights)
        else:
            out = self.run(take_rows(train, rows), train_ids[rows], query, query_ids, int(seed))
        return out.detach().double().numpy()

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def run_weighted(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int,
                     weights: torch.Tensor | None) -> torch.Tensor:
        """Train on every row with per-example data ``weights`` (n,) (``None``: every weight 1, the
        unweighted run itself); jobs with ``supports_weights``."""
        raise NotImplementedError


__all__ = ["QUERY_SETS", "SubsetJob", "job_data", "take_rows"]
