"""Subset retraining jobs of each model family: LDS ground truth and AirRep supervision.

A job is a picklable :class:`~pipelines.ground_truth.RetrainJob`, ``(training rows, seed) ->
(m,) outputs``: it trains the family's recipe from scratch on the given rows of the run's
training set and returns the measured output f (METHODS.md section 1) of every query:

- classifier: the classification margin (SGD recipe of :func:`tda.training.train_classifier`);
- causal-lm: ``log p(completion | prompt)`` with the family's reduction (AdamW recipe of
  :func:`tda.lm.train_lm`, ``epochs * ceil(|S| / batch_size)`` steps);
- diffusion: the family's output (``model.options.output``, default the denoising loss
  ``L_simple``) averaged over a fixed seeded grid of ``model.options.timesteps`` timesteps x
  ``noise_draws`` noises (the attribution grid's timesteps; noise seeded apart from the train
  and query sides), after :func:`tda.diffusion.train_ddpm` on the subset.

``queries`` picks the query set: ``"query"`` (the run's evaluation queries; the diffusion
family's generated images need the run folder and are left out) or ``"airrep"`` (the AirRep
training queries, :meth:`pipelines.families.Family.airrep_queries`). ``epochs`` overrides
``train.epochs`` (AirRep's subset models may train for fewer epochs than the attributed model).
Workers rebuild data from the config (cached per process); nothing large goes through the
executor's task graph.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from stores._io import fingerprint
from tda.data import example_ids
from tda.errors import ConfigError
from tda.tasks import classification_margin
from tda.training import train_classifier

if TYPE_CHECKING:
    from .config import RunConfig

QUERY_SETS = ("query", "airrep")
_DATA: dict[str, tuple[dict, np.ndarray, dict, np.ndarray]] = {}


def job_data(cfg: RunConfig, queries: str) -> tuple[dict, np.ndarray, dict, np.ndarray]:
    """``(train batch, train ids, query batch, query ids)`` collated whole with the family's collate,
    cached per process by the sections they depend on."""
    from .families import collated, family_for

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


def _rows(batch: dict[str, torch.Tensor], rows: np.ndarray | slice) -> dict[str, torch.Tensor]:
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

    def __call__(self, task: tuple[np.ndarray, int]) -> np.ndarray:
        rows, seed = task
        torch.set_num_threads(1)
        train, train_ids, query, query_ids = job_data(self.cfg, self.queries)
        keep = slice(0, self.n_queries)
        rows = np.asarray(rows, dtype=np.int64)
        out = self.run(_rows(train, rows), train_ids[rows], _rows(query, keep), query_ids[keep], int(seed))
        return out.detach().double().numpy()

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        raise NotImplementedError


class ClassifierSubsetJob(SubsetJob):
    """Train the classifier recipe on the rows; the margin of every query."""

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        from .families import family_for

        t, family = self.cfg.train, family_for(self.cfg)
        model = train_classifier(lambda: family.build_model(self.cfg), train["x"], train["y"], epochs=self.epochs,
                                 lr=t.lr, batch_size=t.batch_size, seed=seed)
        with torch.no_grad():
            return torch.cat([classification_margin(model(query["x"][lo: lo + 4096]), query["y"][lo: lo + 4096])
                              for lo in range(0, len(query["y"]), 4096)])


class LMSubsetJob(SubsetJob):
    """Train the causal-LM recipe on the sequences; ``log p(completion | prompt)`` of every query."""

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        from tda.lm import LMTask, build_gpt2, train_lm

        from .families import family_for

        t, family = self.cfg.train, family_for(self.cfg)
        tokens = train["input_ids"]  # (|S|, T)
        steps = self.epochs * math.ceil(tokens.shape[0] / t.batch_size)
        model = build_gpt2(family.spec(self.cfg), seed=seed)
        train_lm(model, tokens, steps=steps, lr=t.lr, batch_size=t.batch_size, seed=seed,
                 warmup=max(1, min(100, steps // 10)))
        task = LMTask(family.options(self.cfg).reduction)
        with torch.no_grad():
            return torch.cat([task.output(model.eval(), _rows(query, slice(lo, lo + 256)))
                              for lo in range(0, len(query_ids), 256)])


class DiffusionSubsetJob(SubsetJob):
    """Train the DDPM recipe on the images; each query's output averaged over a seeded grid."""

    GRID_SIDE = 3  # noise seeds apart from the train (0) and query (1) sides of the featurizers

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        from tda.diffusion import DiffusionTask, GridDraws, noise_from_seeds, train_ddpm

        from .families import family_for

        t, family = self.cfg.train, family_for(self.cfg)
        o, sched = family.options(self.cfg), family.schedule(self.cfg)
        model, _ = train_ddpm(lambda: family.build_model(self.cfg), train["x"], train_ids, sched, epochs=self.epochs,
                              lr=t.lr, batch_size=t.batch_size, seed=seed)
        steps, seeds = GridDraws(o.T, o.timesteps, o.noise_draws, seed=self.cfg.featurize.seed,
                                 side=self.GRID_SIDE)(0, query_ids)  # (m, S) each
        task, x = DiffusionTask(sched, o.output), query["x"]
        with torch.no_grad():
            per_draw = [task.output(model, {"x": x, "t": torch.from_numpy(steps[:, s]),
                                            "noise": noise_from_seeds(seeds[:, s], x.shape[1:])})
                        for s in range(steps.shape[1])]
        return torch.stack(per_draw).mean(dim=0)  # (m,)


__all__ = ["ClassifierSubsetJob", "DiffusionSubsetJob", "LMSubsetJob", "QUERY_SETS", "SubsetJob", "job_data"]
