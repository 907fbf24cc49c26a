"""The scorers of :class:`tda.Attributor` that are not one scorer over stored gradient features:
EK-FAC (its own factors and a preconditioned query side) and MAGIC (metagradients through a
replayed training run). Each has the Attributor's ``fit`` / ``scores`` / ``top_k`` /
``self_influence``; :class:`tda.Attributor` hands them its arguments when ``scorer`` names them.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tda.data.sources import is_hf_dataset, num_rows, pair_batch
from tda.errors import ConfigError, QueryError, TDAError
from tda.core.kernel import TopK
from tda.models.tasks import Task


def dense_top_k(scores: np.ndarray, train_ids: np.ndarray, k: int) -> TopK:
    """Top-k proponents and opponents per row of a dense (m, n) score matrix."""
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    k = min(k, scores.shape[1])
    up = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    down = np.argsort(scores, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return TopK(train_ids[up], take(scores, up, axis=1), train_ids[down], take(scores, down, axis=1))


def row_ids(data: Any) -> np.ndarray:
    """Ids of ``data``'s rows: a ``datasets.Dataset``'s ``id`` column, else positions."""
    from tda.data.loading import example_ids

    return example_ids(data) if is_hf_dataset(data) else np.arange(num_rows(data), dtype=np.int64)


class EKFACMethod:
    """EK-FAC influence (:class:`tda.scorers.ekfac.features.EKFACAttributor`) behind the Attributor's API."""

    #: the scorers it serves (:data:`tda.scorers.registry.FEATURES`), the projection it reports,
    #: whether it reads the checkpoints
    features, projection, needs_checkpoints = "preconditioned", "factored", True

    def __init__(self, model: nn.Module, checkpoints: Sequence[Any], collate: Callable | None, task: Task,
                 options: Mapping[str, Any], k_in: int | None, k_out: int | None, seed: int, kind: str,
                 layers: Sequence[str] | None, batch_size: int, device: Any) -> None:
        from tda.scorers.ekfac.features import EKFACAttributor

        self.inner = EKFACAttributor(model, checkpoints, collate, task, k_in=k_in, k_out=k_out, seed=seed,
                                     kind=kind, layers=layers, batch_size=batch_size, device=device,
                                     **dict(options))
        self._train_data: Any = None

    @property
    def train_features(self):
        return self.inner.train_features

    def fit(self, train_data: Any) -> None:
        self.inner.fit(train_data)
        self._train_data = train_data

    def scores(self, query_data: Any) -> np.ndarray:
        return self.inner.scores(query_data)

    def top_k(self, query_data: Any, k: int) -> TopK:
        return self.inner.top_k(query_data, k)

    def self_influence(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        from tda.workflows.curation import self_influence

        if target != "output":
            raise ConfigError("EK-FAC self-influence is of the measured output f (target='output'); "
                              "for the loss gradient use scorer='tracin' or 'trak'")
        if self._train_data is None:
            raise TDAError("call fit(train_data) before self_influence()")
        query = self.inner.featurize_queries(self._train_data)  # the training rows, preconditioned
        return self_influence(self.inner.scorer, self.inner.train_features, query=query)


class MagicMethod:
    """MAGIC (:func:`tda.scorers.magic.magic_scores`): exact metagradients through ``recipe``'s training
    run from ``model_fn``'s initialisation; checkpoints are not read (the recipe replays them)."""

    features, projection, needs_checkpoints = "metagradients", "none", False

    def __init__(self, model: nn.Module, checkpoints: Sequence[Any], collate: Callable | None, task: Task,
                 options: Mapping[str, Any], **_: Any) -> None:
        from tda.scorers.magic import Recipe

        opts = dict(options)
        self.model_fn, self.recipe = opts.pop("model_fn", None), opts.pop("recipe", None)
        if not callable(self.model_fn) or not isinstance(self.recipe, Recipe):
            raise ConfigError("scorer='magic' replays the training run: pass scorer_options={'model_fn': "
                              "a function building the untrained model, 'recipe': tda.scorers.magic.SGDRecipe(...) or "
                              "AdamRecipe(...) as trained}")
        self.collate = collate if collate is not None else _identity
        self.task, self.options = task, opts
        self._train: Any = None
        self._ids: np.ndarray | None = None

    def fit(self, train_data: Any) -> None:
        self._train, self._ids = _rows(train_data), row_ids(train_data)

    def _need_fit(self) -> Any:
        if self._train is None:
            raise TDAError("call fit(train_data) before scoring")
        return self._train

    def scores(self, query_data: Any) -> np.ndarray:
        from tda.scorers.magic import magic_scores

        out = magic_scores(self.model_fn, self._need_fit(), _rows(query_data), self.collate, self.recipe, self.task,
                           **self.options)
        return np.asarray(out, dtype=np.float32)

    def top_k(self, query_data: Any, k: int) -> TopK:
        return dense_top_k(self.scores(query_data), self._ids, k)

    def self_influence(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        if target != "output":
            raise ConfigError("MAGIC self-influence is d f_i / d w_i of the measured output (target='output')")
        return self._ids, np.diag(self.scores(self._need_fit())).astype(np.float64)


def _identity(batch: Any) -> Any:
    return batch


def _rows(data: Any) -> Any:
    """MAGIC's data: a ``datasets.Dataset`` as is, tensors as a mapping (a pair is ``x``, ``y``)."""
    if is_hf_dataset(data) or isinstance(data, Mapping):
        return data
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return pair_batch(data)
    raise ConfigError("scorer='magic' takes a datasets.Dataset or tensors ({'x': X, 'y': Y} or (X, Y)); collate "
                      "a PyTorch Dataset into tensors first")


#: the Attributor's methods that fit their own features or scores, by what they score
API_METHODS = {cls.features: cls for cls in (EKFACMethod, MagicMethod)}

__all__ = ["API_METHODS", "EKFACMethod", "MagicMethod", "dense_top_k", "row_ids"]
