"""EK-FAC influence functions: fitting the factors (docs/methods.md section 8; George et al. 2018,
Grosse et al. 2023, as in kronfluence).

Influence of training example i on the measured output f(z) of a query (sign: > 0 means that
training on i raises f(z), as for every scorer). Up-weighting i by eps in the mean training
loss moves the parameters by ``-eps H^-1 grad L_i``, so

    tau(z)_i = d f(z) / d eps = -grad f(z)^T H^-1 grad L_i = grad f(z)^T H^-1 (Q_i grad f_i)

with ``Q = -dL/df`` the task's loss weight (classification: cross entropy is ``softplus(-f)``
of the margin, so ``Q = 1 - p_y``; causal LM: ``f`` is minus the loss, ``Q = 1``). Every loss
gradient here is ``-Q`` times the captured gradient of ``f``, so any :class:`~tda.models.tasks.Task`
works without a separate loss.

``H`` is block-diagonal over the supported layers (:data:`tda.featurizers.factored.SUPPORTED`: nn.Linear,
transformers' Conv1D, nn.Conv2d through unfolded patches), each block EK-FAC. For a layer with
per-position inputs ``a_t`` (a ones column appended for the bias) and output loss gradients
``delta_t``, the per-example gradient is ``G_i = sum_t delta_t a_t^T`` (d_out x d_in):

1. covariance pass: ``A = E[sum_t a_t a_t^T]``, ``S = E[sum_t delta_t delta_t^T]``; their
   eigenvectors ``Q_A`` (d_in x d_in) and ``Q_S`` (d_out x d_out), in float64;
2. eigenvalue correction (second pass): ``Lambda = E[(Q_S^T G_i Q_A)^2]`` elementwise
   (d_out x d_in); for one position (an MLP) ``Q_S^T G_i Q_A = (Q_S^T delta)(Q_A^T a)^T``, so
   the batch's sum is one matmul of squared rotated vectors, never forming ``G_i``;
3. damping per layer: ``lambda_L = damping_rel * mean(Lambda_L)`` (kronfluence's heuristic,
   ``damping_rel = 0.1``) or an absolute ``damping``;
4. ``H_L^-1 G = Q_S [(Q_S^T G Q_A) / (Lambda + lambda_L)] Q_A^T`` (see :mod:`tda.scorers.ekfac.features`).

The expectations are over the training examples (divided by n) and, for the labels, by
``fisher``:

- ``"sampled"`` (default, kronfluence's default): the true Fisher, labels drawn from the
  model's predictive distribution, ``samples`` draws per example and pass from a generator
  seeded by ``(seed, checkpoint)`` (reproducible for a fixed batch order). For softmax cross entropy its
  expectation is the Gauss-Newton matrix.
- ``"expected"``: that expectation exactly, every class weighted by its probability (one pass
  per class): EK-FAC of the Gauss-Newton matrix itself; for small class counts.
- ``"empirical"``: the true labels (the empirical Fisher); works for any task.

Label draws need a task with labels: a task's own ``sample_targets(model, batch, generator) ->
batch`` method, else tda's classification tasks (``_logits`` and ``label_key``).

Each checkpoint's factors record a digest of the covered weights; preconditioning under other
weights is refused (an artifact records what it was made from).

Modules: the passes are :mod:`tda.scorers.ekfac.fit`; the query featurizer, the train/query featurizer
pair and the in-memory :class:`~tda.scorers.ekfac.features.EKFACAttributor` are :mod:`tda.scorers.ekfac.features`;
the scorer is :class:`tda.scorers.EKFACScorer`. In memory::

    attr = EKFACAttributor(model, [state_dict], collate, k_in=16, k_out=16).fit(train_rows)
    scores = attr.scores(query_rows)  # (n_query, n_train)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tda.data.loading import Collate, iter_batches
from tda.scorers.ekfac.fit import (CHUNK_ELEMENTS, DEFAULT_DAMPING_REL, FISHERS, EKFACSettings, LayerFactors, factor_width,
                        fit_checkpoint, joined_matrices, projector_of, weights_digest)
from tda.errors import CheckpointError, ConfigError, ShapeError, TDAError, reading
from tda.featurizers.factored import SUPPORTED, LayerSpec, factored_selection
from tda.featurizers.gradient import StateDict
from tda.models.tasks import Batch, Task

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[tuple[np.ndarray, Batch]]]


def _selection(model: nn.Module, layers: Sequence[str] | None, strict: bool) -> tuple[list[LayerSpec], list[str]]:
    """The covered layers and the skipped trainable parameters (refused with ``strict``)."""
    specs, skipped = factored_selection(model, layers)
    if skipped and strict:
        raise ConfigError(f"EK-FAC covers only {SUPPORTED} layers; these trainable parameters would be left out "
                          f"of H and the scores: {skipped[:20]}; restrict layers=[...] to supported modules, freeze "
                          "them (requires_grad_(False)) or pass strict=False to skip them")
    if skipped:
        logger.warning("EK-FAC skips %d trainable parameters outside supported layers: %s", len(skipped), skipped[:20])
    return specs, skipped


class EKFACFactors:
    """EK-FAC factors of a model's supported layers under each checkpoint.

    Build with :meth:`fit` (a ``datasets.Dataset`` and a collate) or :meth:`fit_batches`;
    save with :meth:`save`, load with :meth:`load`. ``factors[c][l]`` is layer ``layers[l]``
    under checkpoint ``checkpoint_ids[c]``.
    """

    def __init__(self, layers: Sequence[LayerSpec], factors: Sequence[Sequence[LayerFactors]],
                 settings: EKFACSettings, checkpoint_ids: Sequence[int], digests: Sequence[str], n: int,
                 task: str, skipped: Sequence[str] = ()) -> None:
        if len(factors) != len(checkpoint_ids) or len(digests) != len(checkpoint_ids):
            raise ShapeError(f"{len(factors)} factor sets and {len(digests)} digests for "
                             f"{len(checkpoint_ids)} checkpoints")
        projector = projector_of(layers, settings)
        for per in factors:
            if len(per) != len(layers):
                raise ShapeError(f"{len(per)} layer factors for {len(layers)} layers")
            for s, f in zip(layers, per):
                w_in, w_out = factor_width(projector, s, "in"), factor_width(projector, s, "out")
                want = {"q_a": (w_in, w_in), "q_s": (w_out, w_out), "lam": (w_out, w_in)}
                for key, shape in want.items():
                    if tuple(getattr(f, key).shape) != shape:
                        raise ShapeError(f"layer {s.name}: {key} has shape {tuple(getattr(f, key).shape)}, expected "
                                         f"{shape}; the factors do not belong to this model: refit them")
        self.layers, self.factors, self.settings = list(layers), [list(p) for p in factors], settings
        self.checkpoint_ids, self.digests = [int(c) for c in checkpoint_ids], list(digests)
        self.n, self.task, self.skipped = int(n), task, list(skipped)

    @classmethod
    def fit(cls, model: nn.Module, task: Task, train_data, collate: Collate,
            checkpoints: Sequence[StateDict | str | Path], batch_size: int = 64, **kwargs: Any) -> "EKFACFactors":
        """Fit on every row of ``train_data`` (a ``datasets.Dataset``) batched by ``collate``;
        ``kwargs`` as for :meth:`fit_batches`."""
        return cls.fit_batches(model, task, lambda: iter_batches(train_data, collate, batch_size), checkpoints,
                               **kwargs)

    @classmethod
    def fit_batches(cls, model: nn.Module, task: Task, batches: Batches, checkpoints: Sequence[StateDict | str | Path],
                    layers: Sequence[str] | None = None, fisher: str = "sampled", samples: int = 1, seed: int = 0,
                    damping: float | None = None, damping_rel: float = DEFAULT_DAMPING_REL,
                    checkpoint_ids: Sequence[int] | None = None, device: str | torch.device | None = None,
                    strict: bool = False, projection: dict | None = None) -> "EKFACFactors":
        """Two passes over the training batches per checkpoint (module docstring).

        Args:
            model: the network; each checkpoint is loaded into it in turn (strictly).
            task: output function (its ``Q`` turns f-gradients into loss gradients).
            batches: zero-argument callable returning a fresh iterable of ``(ids, batch)``.
            checkpoints: state dicts or paths. checkpoint_ids: their ids (default 0..M-1).
            layers: module names or prefixes (see :func:`tda.featurizers.factored.factored_selection`), ``None``: all.
            fisher, samples, seed: the label distribution (module docstring).
            damping: absolute damping for every layer; ``None``: ``damping_rel * mean(Lambda_L)``.
            device: default the model's. strict: refuse (instead of log) trainable parameters
                outside the supported layers, which EK-FAC leaves out of ``H`` and of the scores.
            projection: ``{"k_in", "k_out", "seed", "kind"}`` of a factored projection: fit the
                factors in its space (LoGra: covariances of ``P_in^T a`` and ``P_out^T delta``,
                eigenvalues corrected on ``P_out^T G P_in``), so they precondition projected
                gradients; ``None``: the full layer space.

        Raises:
            ConfigError: bad settings, unsupported layers named (or any with ``strict``).
            NonFiniteError: NaN or infinite inputs, gradients or loss weights (ids named).
            CheckpointError, ShapeError, DataError: as for featurization.
        """
        if projection is not None:
            projection = {"k_in": projection.get("k_in"), "k_out": projection.get("k_out"),
                          "seed": int(projection.get("seed", 0)), "kind": projection.get("kind", "rademacher")}
            if projection["k_in"] is None and projection["k_out"] is None:
                projection = None  # both sides identity: the full space
        settings = EKFACSettings(fisher, samples, seed, damping, damping_rel, projection)
        if not checkpoints:
            raise CheckpointError("at least one checkpoint is needed; pass [model.state_dict()] for one")
        specs, skipped = _selection(model, layers, strict)
        ids = list(range(len(checkpoints))) if checkpoint_ids is None else [int(c) for c in checkpoint_ids]
        if len(ids) != len(checkpoints) or len(set(ids)) != len(ids):
            raise ConfigError(f"checkpoint_ids {ids} must be {len(checkpoints)} distinct ids, one per checkpoint")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model.to(device)
        factors, digests, n = [], [], 0
        for c, state in zip(ids, checkpoints):
            per, n = fit_checkpoint(model, task, specs, settings, c, state, batches(), batches(), device)
            factors.append(per)
            digests.append(weights_digest(model, specs))
            logger.info("EK-FAC checkpoint %d: n=%d, %d layers, damping %s", c, n, len(specs),
                        [float(f"{f.damping:.4g}") for f in per])
        return cls(specs, factors, settings, ids, digests, n, task.name, skipped)

    def index(self, checkpoint: int) -> int:
        """Position of checkpoint id ``checkpoint`` in :attr:`factors`."""
        if checkpoint not in self.checkpoint_ids:
            raise CheckpointError(f"EK-FAC factors were fitted for checkpoints {self.checkpoint_ids}, not "
                                  f"{checkpoint}; fit them on every checkpoint you featurize")
        return self.checkpoint_ids.index(checkpoint)

    def verify(self, model: nn.Module, checkpoint: int) -> None:
        """Raise unless ``model`` holds the weights checkpoint ``checkpoint``'s factors were fitted under."""
        if weights_digest(model, self.layers) != self.digests[self.index(checkpoint)]:
            raise CheckpointError(f"the loaded weights of checkpoint {checkpoint} differ from those its EK-FAC "
                                  "factors were fitted under; refit the factors for these checkpoints")

    def spec(self) -> dict[str, Any]:
        """What determines the factors (recorded in query features' specs and in saved files)."""
        return {"method": "ekfac", **asdict(self.settings), "layers": [asdict(s) for s in self.layers],
                "checkpoint_ids": self.checkpoint_ids, "digests": self.digests, "n": self.n, "task": self.task,
                "skipped": self.skipped}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain arrays (``np.savez``, loaded without pickle): the spec as JSON and every factor."""
        state = {"spec": np.array(json.dumps(self.spec()))}
        for c, per in enumerate(self.factors):
            for i, f in enumerate(per):
                state.update({f"c{c}_l{i}_q_a": f.q_a.numpy(), f"c{c}_l{i}_q_s": f.q_s.numpy(),
                              f"c{c}_l{i}_lam": f.lam.numpy(), f"c{c}_l{i}_damping": np.array(f.damping)})
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> "EKFACFactors":
        """Inverse of :meth:`state_dict`; shapes are checked against the recorded layers."""
        if "spec" not in state:
            raise TDAError("not an EK-FAC factor file (no 'spec' entry); refit the factors")
        spec = json.loads(str(state["spec"]))
        layers = [LayerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                  for s in spec["layers"]]
        settings = EKFACSettings(spec["fisher"], spec["samples"], spec["seed"], spec["damping"], spec["damping_rel"],
                                 spec.get("projection"))
        try:
            factors = [[LayerFactors(*(torch.from_numpy(np.asarray(state[f"c{c}_l{i}_{key}"]))
                                       for key in ("q_a", "q_s", "lam")), float(state[f"c{c}_l{i}_damping"]))
                        for i in range(len(layers))] for c in range(len(spec["checkpoint_ids"]))]
        except KeyError as exc:
            raise TDAError(f"EK-FAC factor file is missing {exc}; refit the factors") from exc
        return cls(layers, factors, settings, spec["checkpoint_ids"], spec["digests"], spec["n"], spec["task"],
                   spec["skipped"])

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (``.npz``) through a temporary file renamed into place."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **self.state_dict())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EKFACFactors":
        """Read a file written by :meth:`save`."""
        with reading(path, "EK-FAC factor file", "refit and save the factors again"):
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        return cls.from_state_dict(state)


__all__ = ["CHUNK_ELEMENTS", "DEFAULT_DAMPING_REL", "EKFACFactors", "EKFACSettings", "FISHERS", "LayerFactors",
           "joined_matrices"]