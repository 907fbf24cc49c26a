"""Learned representations for attribution, in the spirit of AirRep (docs/methods.md section 5).

A small encoder head E (linear, or a two-layer MLP) maps frozen representations h(z) (a named
module's output, concatenated over checkpoints and standardised with the training set's
per-dimension mean and standard deviation) to embeddings ``e(z) = E(h(z))`` of width D. The
attribution score is their inner product

    tau(z)_i = <e(z), e(z_i)>,

a pair of transforms like every scorer (:class:`tda.scorers.AirRepScorer`), scored by
:mod:`tda.core.kernel` and served by the FAISS index.

Supervision is subset-retraining data (:class:`AirRepData`): Q *training queries* q (disjoint
from the training set and from every evaluation query: :func:`check_disjoint`), J random
subsets S_j of the training set and the measured output y_j(q) of a model retrained on S_j.
The group score of a subset is

    g_j(q) = sum_{i in S_j} w_qji <e(q), e(z_i)>,

with ``w = 1`` (``pooling="sum"``: the linear group prediction the LDS evaluates) or
``w_qj. = |S_j| softmax_{i in S_j}(|<e(q), e(z_i)>| / temperature)`` (``pooling="attention"``:
AirRep's attention over a group's members; individual scores stay ``<e(q), e(z_i)>``). Per
query, g is standardised over subsets (a ranking is invariant to a per-query affine map) and
the weighted pairwise ranking loss

    L = sum_q sum_{a, b: y_a(q) > y_b(q)} w_ab softplus(-beta (g~_a(q) - g~_b(q))) / sum w_ab,

with ``w_ab = min(|y~_a(q) - y~_b(q)|, max_weight)`` (y~: outputs standardised per query, so
near-ties count little and large gaps are clipped), is minimised with AdamW on minibatches of
queries. With ``center`` each subset's mean output over the training queries is subtracted
first: a shift shared by every query of one retraining (its seed, its overall fit) is noise no
per-example score predicts (off by default: on MNIST it did not raise the held-out ranking). A seeded fraction of the training queries *and* of
the subsets is held out (the subsets only when at least 3 can be held out and 2 kept); the
head with the best held-out ranking (mean over held-out queries of the Spearman correlation
of g and y over held-out subsets) is kept. Holding out subsets matters: one retraining's noise
is shared by all queries, so queries alone would reward memorising the training subsets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.errors import ConfigError, DataError, LeakageError, NonFiniteError, ShapeError
from tda.validation import spearman_columns

logger = logging.getLogger(__name__)

POOLINGS = ("sum", "attention")
_PAIR_BUDGET = 1 << 22  # (queries x J x J) pair terms per minibatch
_ATTENTION_BUDGET = 1 << 24  # (queries x J x n) attention terms per minibatch


@dataclass
class HeadConfig:
    """The encoder head and its training (module docstring).

    Attributes:
        width: embedding width D. hidden: MLP hidden width (0: a linear head).
        steps: Adam steps. lr: learning rate. weight_decay: AdamW decay of the head's weights.
        pooling: ``"sum"`` or ``"attention"``; temperature: attention softmax temperature.
        beta: slope of the ranking loss on standardised group scores.
        max_weight: clip of the pair weights |y~_a - y~_b|.
        center: subtract each subset's mean output over the queries before ranking.
        batch_queries: training queries per step.
        val_fraction: share of training queries (and subsets) held out to choose the best step
            (0: keep the last).
        eval_every: steps between held-out evaluations. seed: initialisation and minibatches.
    """

    width: int = 64
    hidden: int = 0
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pooling: str = "sum"
    temperature: float = 1.0
    beta: float = 2.0
    max_weight: float = 2.0
    center: bool = False
    batch_queries: int = 64
    val_fraction: float = 0.2
    eval_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.width, self.steps, self.eval_every, self.batch_queries) < 1 or self.hidden < 0:
            raise ConfigError(f"AirRep head needs width, steps, batch_queries, eval_every >= 1 and hidden >= 0; "
                              f"got {self.width}, {self.steps}, {self.batch_queries}, {self.eval_every}, {self.hidden}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"AirRep pooling {self.pooling!r} is unknown; use one of {list(POOLINGS)}")
        if not (self.lr > 0 and self.temperature > 0 and self.beta > 0 and self.max_weight > 0
                and self.weight_decay >= 0):
            raise ConfigError("AirRep lr, temperature, beta and max_weight must be > 0 and weight_decay >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"AirRep val_fraction must be in [0, 1), got {self.val_fraction}")


class EncoderHead(nn.Module):
    """``E``: (B, in_dim) -> (B, width); linear when ``hidden == 0``, else Linear-GELU-Linear."""

    def __init__(self, in_dim: int, width: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, width))
        else:
            self.layers = nn.Sequential(nn.Linear(in_dim, width))

    def forward(self, h: Tensor) -> Tensor:
        return self.layers(h)


def check_disjoint(fit_keys: Sequence[str], others: Mapping[str, Sequence[str]],
                   what: str = "AirRep training queries") -> None:
    """Raise :class:`LeakageError` if any key of ``fit_keys`` is also in one of ``others``.

    Keys name where an example comes from (e.g. ``"mnist/train/5123"``, or one key per corpus
    character for text), so equal keys mean the same underlying example.

    Args:
        fit_keys: provenance of the examples a scorer is fitted on.
        others: name -> provenance of examples they must not overlap (the training set, the
            evaluation queries).
    """
    fit = set(fit_keys)
    for name, keys in others.items():
        shared = sorted(fit.intersection(keys))
        if shared:
            raise LeakageError(
                f"{len(shared)} of the {what} are also {name} (e.g. {shared[:3]}); they must be disjoint, "
                "or the attribution is fitted on what it is judged on. Take the training queries from "
                "examples outside both (for the pipelines: lower data.train_size or score.options.queries)"
            )


@dataclass
class AirRepData:
    """Subset-retraining supervision for an AirRep head.

    Attributes:
        train_ids: (n,) ids of the training examples, in the order of the mask columns.
        query_feats: (M, Q, H) representations of the Q training queries per checkpoint.
        query_ids: (Q,) their ids.
        masks: (J, n) bool, True where training example i is in subset j.
        outputs: (J, Q) measured output of each training query after retraining on subset j.
        provenance: optional ``{"train": keys, "queries": keys, "evaluation": keys}``; when
            given, the queries are checked disjoint from the other two (:func:`check_disjoint`).
    """

    train_ids: np.ndarray
    query_feats: np.ndarray
    query_ids: np.ndarray
    masks: np.ndarray
    outputs: np.ndarray
    provenance: dict[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train_ids = np.asarray(self.train_ids, dtype=np.int64)
        self.query_ids = np.asarray(self.query_ids, dtype=np.int64)
        self.query_feats = np.asarray(self.query_feats, dtype=np.float32)
        self.masks = np.asarray(self.masks, dtype=bool)
        self.outputs = np.asarray(self.outputs, dtype=np.float64)
        n, q = len(self.train_ids), len(self.query_ids)
        if self.query_feats.ndim != 3 or self.query_feats.shape[1] != q:
            raise ShapeError(f"query_feats must be (M, Q={q}, H), got {self.query_feats.shape}")
        if self.masks.ndim != 2 or self.masks.shape[1] != n or self.outputs.shape != (len(self.masks), q):
            raise ShapeError(f"masks must be (J, n={n}) and outputs (J, Q={q}); got {self.masks.shape} and "
                             f"{self.outputs.shape}")
        if len(self.masks) < 2 or q < 1:
            raise DataError(f"AirRep needs at least 2 subsets and 1 training query, got {len(self.masks)} and {q}")
        if not (np.isfinite(self.outputs).all() and np.isfinite(self.query_feats).all()):
            raise NonFiniteError("AirRep supervision holds NaN or inf outputs/representations; recompute it")
        if self.provenance:
            missing = {"train", "queries", "evaluation"} - set(self.provenance)
            if missing:
                raise DataError(f"AirRep provenance needs keys train, queries, evaluation; missing {sorted(missing)}")
            check_disjoint(self.provenance["queries"], {"training examples": self.provenance["train"],
                                                        "evaluation queries": self.provenance["evaluation"]})


def _standardize(x: Tensor, dim: int) -> Tensor:
    return (x - x.mean(dim=dim, keepdim=True)) / (x.std(dim=dim, keepdim=True) + 1e-8)


def group_scores(e_query: Tensor, e_train: Tensor, masks: Tensor, pooling: str = "sum",
                 temperature: float = 1.0) -> Tensor:
    """Group scores ``g[q, j]`` of subsets for queries (module docstring).

    Args:
        e_query: (Q, D) query embeddings. e_train: (n, D) training embeddings.
        masks: (J, n) float 0/1 subset masks.

    Returns:
        (Q, J) group scores.
    """
    if pooling == "sum":
        return e_query @ (masks @ e_train).T  # (Q, D) @ (D, J)
    sims = e_query @ e_train.T  # (Q, n)
    logits = (sims.abs() / temperature)[:, None, :].expand(-1, masks.shape[0], -1)  # (Q, J, n)
    logits = logits.masked_fill(masks[None] == 0, float("-inf"))
    weights = torch.softmax(logits, dim=2) * masks.sum(dim=1)[None, :, None]  # (Q, J, n), rows sum to |S_j|
    return (weights * sims[:, None, :]).sum(dim=2)


def ranking_loss(g: Tensor, y: Tensor, beta: float = 2.0, max_weight: float = 2.0) -> Tensor:
    """Weighted pairwise ranking loss of group scores ``g`` against outputs ``y``, both (Q, J)."""
    gs, ys = _standardize(g, 1), _standardize(y, 1)
    dg = gs[:, :, None] - gs[:, None, :]  # (Q, J, J): g~_a - g~_b
    dy = ys[:, :, None] - ys[:, None, :]
    weight = torch.where(dy > 0, dy.clamp(max=max_weight), torch.zeros_like(dy))
    return (weight * nn.functional.softplus(-beta * dg)).sum() / weight.sum().clamp_min(1e-12)


@dataclass
class TrainedHead:
    """A fitted head and how its training went.

    Attributes:
        head: the encoder (eval mode). mean, std: (in_dim,) input standardisation.
        loss: ranking loss per step (training queries). val_spearman: held-out mean Spearman
            at each evaluation (empty without held-out queries). best_step: the step kept.
    """

    head: EncoderHead
    mean: np.ndarray
    std: np.ndarray
    loss: list[float]
    val_spearman: list[float]
    best_step: int


def _holdout(count: int, fraction: float, rng: np.random.Generator, least: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held out) indices; nothing held out unless ``least`` can be held out and kept."""
    order = rng.permutation(count)
    n_val = int(round(fraction * count))
    if n_val < least or count - n_val < min(least, 2):
        return np.arange(count), np.array([], dtype=np.int64)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def held_out_spearman(g: Tensor, y: Tensor) -> float:
    """Mean over queries of the Spearman correlation of g and y over subsets; (Q, J) each."""
    rho = spearman_columns(g.detach().double().numpy().T, y.double().numpy().T)
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")


class _Problem:
    """Standardised inputs, subset masks and (centred) outputs, split into fit and held-out parts."""

    def __init__(self, h_train: np.ndarray, h_query: np.ndarray, masks: np.ndarray, outputs: np.ndarray,
                 c: HeadConfig) -> None:
        x = torch.from_numpy(np.ascontiguousarray(h_train, dtype=np.float32))
        self.mean, std = x.mean(dim=0), x.std(dim=0)
        self.std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.x_train = (x - self.mean) / self.std  # (n, in_dim)
        self.x_query = (torch.from_numpy(np.ascontiguousarray(h_query, dtype=np.float32)) - self.mean) / self.std
        self.masks = torch.from_numpy(np.asarray(masks, dtype=np.float32))  # (J, n)
        y = torch.from_numpy(np.asarray(outputs, dtype=np.float32)).T.contiguous()  # (Q, J)
        self.y = y - y.mean(dim=0, keepdim=True) if c.center else y
        rng = np.random.default_rng([c.seed, 7])
        self.fit_q, self.val_q = _holdout(len(self.y), c.val_fraction, rng, 2)
        self.fit_j, self.val_j = _holdout(len(self.masks), c.val_fraction, rng, 3)
        if not len(self.val_j):
            self.val_j = self.fit_j  # too few subsets to hold any out: validate on held-out queries only
        budget = _PAIR_BUDGET // len(self.fit_j) ** 2
        if c.pooling == "attention":
            budget = min(budget, _ATTENTION_BUDGET // (len(self.fit_j) * self.masks.shape[1]))
        self.batch = max(1, min(len(self.fit_q), c.batch_queries, budget))

    def group(self, head: EncoderHead, queries: np.ndarray, subsets: np.ndarray, c: HeadConfig) -> Tensor:
        """(len(queries), len(subsets)) group scores under ``head``."""
        return group_scores(head(self.x_query[torch.from_numpy(queries)]), head(self.x_train),
                            self.masks[torch.from_numpy(subsets)], c.pooling, c.temperature)

    def targets(self, queries: np.ndarray, subsets: np.ndarray) -> Tensor:
        return self.y[np.ix_(queries, subsets)]


def train_head(h_train: np.ndarray, h_query: np.ndarray, masks: np.ndarray, outputs: np.ndarray,
               config: HeadConfig, progress: bool = False) -> TrainedHead:
    """Train an encoder head on subset-retraining data (module docstring).

    Args:
        h_train: (n, in_dim) training representations. h_query: (Q, in_dim) training queries.
        masks: (J, n) bool subsets. outputs: (J, Q) measured outputs.
        config: head and optimisation settings. progress: log the loss every evaluation.

    Returns:
        :class:`TrainedHead`; deterministic on CPU for a given ``config.seed``.
    """
    c, prob = config, _Problem(h_train, h_query, masks, outputs, config)
    torch.manual_seed(c.seed)
    head = EncoderHead(prob.x_train.shape[1], c.width, c.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    gen = np.random.default_rng([c.seed, 11])
    losses, vals, best = [], [], (-np.inf, c.steps, None)
    for step in range(c.steps):
        head.train()
        pick = np.sort(gen.choice(prob.fit_q, prob.batch, replace=False))
        loss = ranking_loss(prob.group(head, pick, prob.fit_j, c), prob.targets(pick, prob.fit_j), c.beta,
                            c.max_weight)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"AirRep ranking loss became {loss.item()} at step {step}; lower the head's lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(prob.val_q) and ((step + 1) % c.eval_every == 0 or step + 1 == c.steps):
            head.eval()
            with torch.no_grad():
                vals.append(held_out_spearman(prob.group(head, prob.val_q, prob.val_j, c),
                                              prob.targets(prob.val_q, prob.val_j)))
            if progress:
                logger.info("AirRep step %d loss %.4f held-out Spearman %.4f", step + 1, losses[-1], vals[-1])
            if vals[-1] > best[0]:
                best = (vals[-1], step + 1, {k: v.clone() for k, v in head.state_dict().items()})
    if best[2] is not None:
        head.load_state_dict(best[2])
    return TrainedHead(head.eval(), prob.mean.numpy(), prob.std.numpy(), losses, vals, best[1])


__all__ = ["AirRepData", "EncoderHead", "HeadConfig", "POOLINGS", "TrainedHead", "check_disjoint", "group_scores",
           "held_out_spearman", "ranking_loss", "train_head"]
