"""The public Python API: attribute a model's predictions to its training data.

Example::

    import tda
    from tda.data.loading import load_mnist, mnist_collate

    train, test = load_mnist(root, "train", 5000), load_mnist(root, "test", 100)
    attr = tda.Attributor(model, checkpoints=[sd0, sd1, sd2], collate=mnist_collate, k=1024)
    attr.fit(train)                      # featurize the training set, fit TRAK
    scores = attr.scores(test)           # (100, 5000) float32
    top = attr.top_k(test, k=10)         # proponents / opponents per query
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tda.data.loading import Collate, iter_batches
from tda.data.sources import num_rows
from tda.errors import CheckpointError, ConfigError, TDAError
from tda.core.features import ArrayFeatures, FeatureBlock, concat_blocks
from tda.featurizers.factored import FactoredFeaturizer
from tda.featurizers.gradient import Featurizer
from tda.core.kernel import TopK, score_matrix, top_k
from tda.featurizers.choice import FALLBACK, ProjectionChoice, choose_projection, structural_choice
from tda.featurizers.spec import make_featurizer, projection_spec
from tda.api.methods import API_METHODS
from tda.scorers import Scorer, TRAKScorer
from tda.scorers.registry import scorer_entry
from tda.models.defaults import default_task, snapshot
from tda.models.tasks import Task

logger = logging.getLogger(__name__)


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
            relative feature error; see :class:`~tda.projections.projectors.Projector`).
        grad_method: per-example gradient path (see :class:`~tda.featurizers.gradient.Featurizer`).
        projection: ``"auto"`` (the default: ``"tensorsketch"`` where it covers every trainable
            parameter and its captures reproduce autograd's per-example gradient norms on the
            first training batch, else ``"sparse"`` with the reason logged;
            :mod:`tda.featurizers.choice`; the choice is :attr:`projection`, its reason
            :attr:`projection_reason`), ``"sparse"`` (SJLT with ``nonzeros`` entries per gradient
            coordinate, :class:`~tda.projections.sparse.SparseProjector`; the same LDS as dense at equal k),
            ``"dense"`` (d x k matrix, as traker), ``"tensorsketch"`` (each supported
            layer's gradient TensorSketched into the same ``k`` outputs from its inputs and
            output gradients, never forming the gradient; embeddings, a tied LM head and affine
            norms included, other parameters refused; ``param_names`` then names modules;
            :class:`~tda.projections.tensorsketch.TensorSketchProjector`) or ``"factored"``
            (per-layer Kronecker ``k_out x k_in``, never forming the gradient; ``param_names``
            then names modules, ``k`` is unused; :class:`~tda.featurizers.factored.FactoredFeaturizer`).

    Hugging Face transformers models work the same way (see :mod:`tda.models.hf`): checkpoints may be
    ``save_pretrained`` folders or ``.safetensors`` files, and without ``task`` a transformers
    model gets :func:`tda.models.hf.hf_task_for` (classification margin or completion log-probability).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[Mapping[str, Tensor] | str | Path],
        collate: Collate | None = None,
        task: Task | None = None,
        scorer: Scorer | str | None = None,
        k: int = 1024,
        seed: int = 0,
        kind: str = "rademacher",
        param_names: Sequence[str] | None = None,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        progress: bool = False,
        precision: str = "fp32",
        grad_method: str = "auto",
        projection: str = "auto",
        nonzeros: int = 1,
        k_in: int | None = 16,
        k_out: int | None = 16,
        scorer_options: Mapping[str, Any] | None = None,
    ) -> None:
        method_type = _method_type(scorer)
        if not checkpoints and (method_type is None or method_type.needs_checkpoints):
            raise CheckpointError("at least one checkpoint is needed; pass model.state_dict() for one")
        # Snapshots: a live model.state_dict() shares the model's tensors, and featurizing loads
        # each checkpoint into the model; neither the user's model nor their state dicts change.
        self.checkpoints = [snapshot(c) for c in checkpoints]
        model = copy.deepcopy(model)
        self.collate = collate
        task = task or default_task(model)
        self.method = None if method_type is None else method_type(
            model, self.checkpoints, collate, task, dict(scorer_options or {}), k_in=k_in, k_out=k_out, seed=seed,
            kind=kind, layers=param_names, batch_size=batch_size, device=device)
        self.scorer = (scorer_by_name(scorer, len(self.checkpoints), scorer_options) if self.method is None
                       else self.method)
        self._settings = dict(model=model, task=task, k=k, seed=seed, kind=kind, param_names=param_names,
                              device=device, precision=precision, grad_method=grad_method, nonzeros=nonzeros,
                              k_in=k_in, k_out=k_out)
        self._auto = projection == "auto" and self.method is None  # checked on the first batch (choose_projection)
        choice = (structural_choice(model, param_names) if self._auto else
                  ProjectionChoice(projection, "requested") if self.method is None else
                  ProjectionChoice(method_type.projection, f"scorer {scorer!r}"))
        self.projection, self.projection_reason = choice.projection, choice.reason
        # EK-FAC and MAGIC featurize (or replay) themselves
        self.featurizer = self._featurizer(choice.projection) if self.method is None else None
        self.batch_size = batch_size
        self.progress = progress
        self.train_features: ArrayFeatures | None = None
        self._fitted = False

    def _featurizer(self, projection: str) -> Featurizer | FactoredFeaturizer:
        o = self._settings
        spec = projection_spec(projection, k=o["k"], seed=o["seed"], kind=o["kind"], precision=o["precision"],
                               nonzeros=o["nonzeros"], k_in=o["k_in"], k_out=o["k_out"])
        return make_featurizer(spec, o["model"], o["task"], param_names=o["param_names"], device=o["device"],
                               grad_method=o["grad_method"])

    def _settle_projection(self, data) -> None:
        """``projection="auto"``: check the structural choice on the first batch, once."""
        if not self._auto:
            return
        self._auto = False
        if self.projection == FALLBACK:
            logger.warning("projection auto: %s, because %s", FALLBACK, self.projection_reason)
            return
        _, batch = next(iter_batches(data, self.collate, 2))
        choice = choose_projection(self._settings["model"], self._settings["task"], batch,
                                   self._settings["param_names"], self.checkpoints[-1], self._settings["device"])
        self.projection, self.projection_reason = choice.projection, choice.reason
        if choice.projection != "tensorsketch":
            self.featurizer = self._featurizer(choice.projection)

    def featurize(self, data) -> FeatureBlock:
        """Features of every example of ``data`` (a ``datasets.Dataset``, tensors, a PyTorch
        ``Dataset`` or ``DataLoader``: :mod:`tda.data.sources`) under every checkpoint."""
        if self.featurizer is None:
            raise TDAError(f"{self.projection_reason} featurizes its own way; call fit, "
                           "scores, top_k or self_influence")
        self._settle_projection(data)
        per_ckpt = []
        for c, state in enumerate(self.checkpoints):
            batches = iter_batches(data, self.collate, self.batch_size)
            rows = []
            bar = tqdm(total=num_rows(data), desc=f"featurize ckpt {c}", disable=not self.progress, unit="ex")
            for ids, phi, q in self.featurizer.featurize(state, c, batches):
                rows.append(FeatureBlock(ids, phi[None], q[None]))
                bar.update(len(ids))
            bar.close()
            per_ckpt.append(concat_blocks(rows))
        return FeatureBlock(per_ckpt[0].ids, np.concatenate([b.feats for b in per_ckpt]),
                            np.concatenate([b.q for b in per_ckpt]))

    def fit(self, train_data) -> "Attributor":
        """Featurize the training set and fit the scorer."""
        if self.method is not None:
            self.method.fit(train_data)
            self.train_features = getattr(self.method, "train_features", None)  # MAGIC keeps none
            self._fitted = True
            return self
        self.train_features = ArrayFeatures(self.featurize(train_data), range(len(self.checkpoints)))
        self.scorer.fit(self.train_features)
        self._fitted = True
        return self

    def _train(self) -> ArrayFeatures:
        if self.train_features is None:
            raise TDAError("call fit(train_data) before scoring")
        return self.train_features

    def scores(self, query_data) -> np.ndarray:
        """Dense scores (n_query, n_train); > 0 means the training example raises f(query)."""
        if self.method is not None:
            self._need_fit()
            return self.method.scores(query_data)
        return score_matrix(self.featurize(query_data), self.scorer, self._train())

    def top_k(self, query_data, k: int = 10) -> TopK:
        """Top-k proponents (raise f) and opponents (lower f) per query, by training id."""
        if self.method is not None:
            self._need_fit()
            return self.method.top_k(query_data, k)
        return top_k(self.featurize(query_data), self.scorer, self._train(), k)

    def self_influence(self, target: str = "output") -> tuple[np.ndarray, np.ndarray]:
        """``(train_ids, scores)`` in the order of the training data given to :meth:`fit`: each
        training example's score against itself, the curation signal (large: the example is
        unusual for the model, e.g. mislabelled).

        ``target="output"``: of the measured output f (the scorer's own query side); ``"loss"``:
        of the training loss, whose per-example gradient is ``Q grad f`` (``Q = |dLoss/df|``,
        :meth:`tda.models.tasks.Task.loss_weight`), i.e. the features scaled by Q with Q = 1 after
        (gradient scorers: TracIn, Grad-Dot, Grad-Cos, TRAK). For TracIn this is Captum's and
        the original paper's self-influence; ``benchmarks/self_influence.py`` measures both for
        mislabel detection.
        """
        from tda.workflows.curation import loss_self_influence, self_influence

        if target not in ("output", "loss"):
            raise ConfigError(f"target must be 'output' or 'loss', got {target!r}")
        if self.method is not None:
            self._need_fit()
            return self.method.self_influence(target)
        train = self._train()
        if target == "output":
            return self_influence(self.scorer, train)
        return loss_self_influence(self.scorer, train)

    def _need_fit(self) -> None:
        if not self._fitted:
            raise TDAError("call fit(train_data) before scoring")


def scorer_by_name(scorer: Scorer | str | None, checkpoints: int, options: Mapping[str, Any] | None) -> Scorer:
    """The scorer over gradient features that ``scorer`` names in :mod:`tda.scorers.registry`
    (``None``: TRAK at its defaults), built with ``options`` over the entry's defaults for
    ``checkpoints`` checkpoints (TracIn weighs them equally unless ``learning_rates`` is given)."""
    if scorer is None or not isinstance(scorer, str):
        if options:
            raise ConfigError("scorer_options apply to a scorer given by name; configure a Scorer object directly")
        return scorer if scorer is not None else TRAKScorer()
    entry = scorer_entry(scorer)
    if entry.features == "representations":
        raise ConfigError(f"scorer {scorer!r} reads representations, not gradients: use "
                          "tda.RepresentationFeaturizer with tda.RepSimScorer / tda.AirRepScorer, or tda run")
    if entry.features != "gradients":
        raise ConfigError(f"scorer {scorer!r} fits its own {entry.features} features; the Attributor has no "
                          "method for them")
    return entry.build(checkpoints, **dict(options or {}))


def _method_type(scorer: Any) -> Any:
    """The Attributor's own method (EK-FAC, MAGIC: :data:`tda.api.methods.API_METHODS`) for the
    scorer ``scorer`` names, else None (a scorer over the Attributor's gradient features)."""
    if not isinstance(scorer, str):
        return None
    return API_METHODS.get(scorer_entry(scorer).features)
