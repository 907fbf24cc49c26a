"""The public Python API: attribute a model's predictions to its training data.

Example::

    import tda
    from tda.data import load_mnist, mnist_collate

    train, test = load_mnist(root, "train", 5000), load_mnist(root, "test", 100)
    attr = tda.Attributor(model, checkpoints=[sd0, sd1, sd2], collate=mnist_collate, k=1024)
    attr.fit(train)                      # featurize the training set, fit TRAK
    scores = attr.scores(test)           # (100, 5000) float32
    top = attr.top_k(test, k=10)         # proponents / opponents per query
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import Collate, iter_batches
from .errors import CheckpointError, TDAError
from .features import ArrayFeatures, FeatureBlock, concat_blocks
from .factored import FactoredFeaturizer
from .featurize import Featurizer
from .kernel import TopK, score_matrix, top_k
from .scorers import Scorer, TRAKScorer
from .tasks import ClassificationTask, Task


def _default_task(model: nn.Module) -> Task:
    """:class:`ClassificationTask`, or the task for a transformers model's head."""
    if type(model).__module__.startswith("transformers."):
        from .hf import hf_task_for

        return hf_task_for(model)
    return ClassificationTask()


def _snapshot(source):
    """A private copy of a state dict (paths are loaded when used)."""
    if isinstance(source, Mapping):
        return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in source.items()}
    return source


class Attributor:
    """Featurize, fit and query in memory.

    Args:
        model: the ``nn.Module`` (architecture of every checkpoint).
        checkpoints: state dicts or ``torch.save`` paths, one per checkpoint / trained model.
        collate: turns a batch of dataset rows into the task's tensors (e.g. ``mnist_collate``).
        task: output function, default :class:`ClassificationTask`.
        scorer: default :class:`TRAKScorer` with its default ridge.
        k: projection dimension. seed: projection seed. kind: ``rademacher`` or ``gaussian``.
        param_names: parameters to differentiate (``None``: all).
        batch_size: examples per gradient batch. device: default the model's.
        progress: show tqdm bars.
        precision: projection precision, ``"fp32"`` (default) or ``"bf16"`` (faster, ~3e-3
            relative feature error; see :class:`~tda.projectors.Projector`).
        grad_method: per-example gradient path (see :class:`~tda.featurize.Featurizer`).
        projection: ``"sparse"`` (the default: SJLT with ``nonzeros`` entries per gradient
            coordinate, :class:`~tda.sparse.SparseProjector`; the same LDS as dense at equal k,
            faster), ``"dense"`` (d x k matrix, as traker), ``"tensorsketch"`` (each supported
            layer's gradient TensorSketched into the same ``k`` outputs from its inputs and
            output gradients, never forming the gradient; embeddings, a tied LM head and affine
            norms included, other parameters refused; ``param_names`` then names modules;
            :class:`~tda.tensorsketch.TensorSketchProjector`) or ``"factored"``
            (per-layer Kronecker ``k_out x k_in``, never forming the gradient; ``param_names``
            then names modules, ``k`` is unused; :class:`~tda.factored.FactoredFeaturizer`).

    Hugging Face transformers models work the same way (see :mod:`tda.hf`): checkpoints may be
    ``save_pretrained`` folders or ``.safetensors`` files, and without ``task`` a transformers
    model gets :func:`tda.hf.hf_task_for` (classification margin or completion log-probability).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[Mapping[str, Tensor] | str | Path],
        collate: Collate,
        task: Task | None = None,
        scorer: Scorer | None = None,
        k: int = 1024,
        seed: int = 0,
        kind: str = "rademacher",
        param_names: Sequence[str] | None = None,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        progress: bool = False,
        precision: str = "fp32",
        grad_method: str = "auto",
        projection: str = "sparse",
        nonzeros: int = 1,
        k_in: int | None = 16,
        k_out: int | None = 16,
    ) -> None:
        if not checkpoints:
            raise CheckpointError("at least one checkpoint is needed; pass model.state_dict() for one")
        # Snapshots: a live model.state_dict() shares the model's tensors, and featurizing loads
        # each checkpoint into the model; neither the user's model nor their state dicts change.
        self.checkpoints = [_snapshot(c) for c in checkpoints]
        model = copy.deepcopy(model)
        self.collate = collate
        self.scorer = scorer if scorer is not None else TRAKScorer()
        task = task or _default_task(model)
        if projection in ("factored", "tensorsketch"):
            self.featurizer: Featurizer | FactoredFeaturizer = FactoredFeaturizer(
                model, task, k_in=k_in, k_out=k_out, seed=seed, kind=kind, layers=param_names, device=device,
                projection=projection, k=k)
        else:
            self.featurizer = Featurizer(model, task, k=k, seed=seed, kind=kind, param_names=param_names,
                                         device=device, precision=precision, grad_method=grad_method,
                                         projection=projection, nonzeros=nonzeros)
        self.batch_size = batch_size
        self.progress = progress
        self.train_features: ArrayFeatures | None = None

    def featurize(self, data) -> FeatureBlock:
        """Features of every example of ``data`` (a ``datasets.Dataset``) under every checkpoint."""
        per_ckpt = []
        for c, state in enumerate(self.checkpoints):
            batches = iter_batches(data, self.collate, self.batch_size)
            rows = []
            bar = tqdm(total=len(data), desc=f"featurize ckpt {c}", disable=not self.progress, unit="ex")
            for ids, phi, q in self.featurizer.featurize(state, c, batches):
                rows.append(FeatureBlock(ids, phi[None], q[None]))
                bar.update(len(ids))
            bar.close()
            per_ckpt.append(concat_blocks(rows))
        return FeatureBlock(per_ckpt[0].ids, np.concatenate([b.feats for b in per_ckpt]),
                            np.concatenate([b.q for b in per_ckpt]))

    def fit(self, train_data) -> "Attributor":
        """Featurize the training set and fit the scorer."""
        self.train_features = ArrayFeatures(self.featurize(train_data), range(len(self.checkpoints)))
        self.scorer.fit(self.train_features)
        return self

    def _train(self) -> ArrayFeatures:
        if self.train_features is None:
            raise TDAError("call fit(train_data) before scoring")
        return self.train_features

    def scores(self, query_data) -> np.ndarray:
        """Dense scores (n_query, n_train); > 0 means the training example raises f(query)."""
        return score_matrix(self.featurize(query_data), self.scorer, self._train())

    def top_k(self, query_data, k: int = 10) -> TopK:
        """Top-k proponents (raise f) and opponents (lower f) per query, by training id."""
        return top_k(self.featurize(query_data), self.scorer, self._train(), k)
