"""Data curation: self-influence, seeded label noise, and how well a ranking finds flipped labels.

Self-influence of a training example is its score against itself under a scorer,
``<T_query(z_i), T_train(z_i)>`` through the scorer seam (:mod:`tda.scorers.base`): for TRAK
``Q_i phi_i^T (Phi^T Phi + lambda)^-1 phi_i`` averaged over checkpoints, for TracInCP
``sum_c eta_c ||g_c,i||^2``, for Grad-Dot ``||g_i||^2`` averaged. Examples that the model can only
fit by memorising them (mislabelled or atypical ones) score high (Koh & Liang 2017; Pruthi et al. 2020).

Of the output or of the loss: the features are gradients of the measured output f; the training
loss's per-example gradient is ``Q grad f`` (``Q = |dLoss/df|``, the task's loss weight), so
:class:`LossGradients` scales each stored feature row by its Q (and sets Q to 1), and
:func:`loss_self_influence` refits a copy of the scorer on those and takes the same diagonal.
For TracInCP that is ``sum_c eta_c Q_c,i^2 ||g_c,i||^2``, the self-influence of the TracIn paper
and Captum; ``benchmarks/self_influence.py`` measures both for mislabel detection.

Detection metrics follow kronfluence's convention: ROC-AUC, average precision, and the share of the
flipped labels found when a person inspects the top 5 %, 10 % and 20 % of the ranking.
"""

from __future__ import annotations

from typing import Any, Sequence

import copy
from typing import Iterator

import numpy as np
from scipy.stats import rankdata

from tda.errors import ShapeError, TDAError
from tda.core.features import FeatureBlock, FeatureSource
from tda.scorers.base import Scorer

#: shares of the ranking inspected for ``found_at``
INSPECTED = (0.05, 0.10, 0.20)


def flip_labels(labels: np.ndarray, fraction: float, seed: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``fraction`` of ``labels`` moved to another class, uniformly among the others.

    Returns ``(noisy labels, flipped mask)``; the same (labels, fraction, seed) always flip the same rows.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 <= fraction < 1:
        raise TDAError(f"label noise fraction must be in [0, 1), got {fraction}")
    if n_classes < 2:
        raise TDAError(f"label noise needs at least two classes, got {n_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ShapeError(f"labels lie in [{labels.min()}, {labels.max()}], outside the {n_classes} classes")
    rng = np.random.default_rng([seed, 7919])
    count = int(round(fraction * len(labels)))
    rows = rng.choice(len(labels), size=count, replace=False)
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, n_classes, size=count)) % n_classes
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rows] = True
    return noisy, flipped


def shuffle_sequences(tokens: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``fraction`` of (n, T) token sequences with their tokens in a random order: the
    language-model analogue of a flipped label (the targets no longer follow the text), with the
    corpus's token frequencies kept. Returns ``(tokens, corrupted mask)``; a sequence a permutation
    leaves unchanged (e.g. one repeated character) is not counted as corrupted."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ShapeError(f"sequence noise needs (n, T) tokens, got shape {tokens.shape}")
    if not 0 <= fraction < 1:
        raise TDAError(f"sequence noise fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 7927])
    rows = rng.choice(len(tokens), size=int(round(fraction * len(tokens))), replace=False)
    noisy = tokens.copy()
    for r in rows:
        noisy[r] = tokens[r][rng.permutation(tokens.shape[1])]
    return noisy, (noisy != tokens).any(axis=1)


def self_influence(scorer: Scorer, train: FeatureSource, block_rows: int = 4096,
                   query: FeatureBlock | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores)``: each training example's score against itself under a fitted ``scorer``.

    ``query``: the same training examples featurized by another query-side featurizer (EK-FAC's
    preconditioned gradients); by default the query side reads the train features themselves
    (gradient scorers)."""
    rows = vectors = None
    if query is not None:
        vectors = np.asarray(scorer.transform_query(query), dtype=np.float64)
        rows = {int(i): r for r, i in enumerate(query.ids)}
    ids, out = [], []
    for blk in train.iter_blocks(block_rows):
        if vectors is None:
            a = np.asarray(scorer.transform_query(blk), dtype=np.float64)
        else:
            missing = [int(i) for i in blk.ids if int(i) not in rows]
            if missing:
                raise ShapeError(f"the query-side features lack training ids {missing[:5]}; featurize the whole "
                                 "training set")
            a = vectors[[rows[int(i)] for i in blk.ids]]
        b = np.asarray(scorer.transform_train(blk), dtype=np.float64)
        if a.shape != b.shape:
            raise ShapeError(f"{scorer.name}: query-side vectors {a.shape} and train-side {b.shape} differ; "
                             "self-influence needs a scorer whose two sides read the same features")
        ids.append(np.asarray(blk.ids))
        out.append(np.einsum("ij,ij->i", a, b))
    if not ids:
        raise TDAError("no training features to compute self-influence from")
    return np.concatenate(ids), np.concatenate(out)


class LossGradients:
    """A feature source's rows as gradients of the training loss: ``Q phi`` with Q then 1 (streamed)."""

    def __init__(self, source: FeatureSource) -> None:
        self.source = source
        self.checkpoints = source.checkpoints

    def __len__(self) -> int:
        return len(self.source)

    @property
    def k(self) -> int:
        return self.source.k

    @property
    def ids(self) -> np.ndarray:
        return self.source.ids

    def iter_blocks(self, block_rows: int = 4096) -> Iterator[FeatureBlock]:
        for blk in self.source.iter_blocks(block_rows):
            yield FeatureBlock(blk.ids, blk.feats * blk.q[..., None].astype(blk.feats.dtype), np.ones_like(blk.q))


def loss_self_influence(scorer: Scorer, train: FeatureSource, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores)``: self-influence of the training loss (see the module docstring): a copy of
    ``scorer`` (fitted or not) refitted on :class:`LossGradients` of ``train``."""
    loss = LossGradients(train)
    fresh = copy.deepcopy(scorer)
    fresh.fit(loss)
    return self_influence(fresh, loss, block_rows)


def rank_average(columns: Sequence[np.ndarray]) -> np.ndarray:
    """An ensemble of rankings: the mean of each column's normalised rank (ties averaged), in [0, 1]."""
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    if not cols:
        raise TDAError("rank_average needs at least one column")
    return np.mean([(rankdata(c) - 1) / max(1, len(c) - 1) for c in cols], axis=0)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher: more suspect) for the boolean ``positive``
    (Mann-Whitney form, ties counted half); NaN when one class is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mean of the precision at each positive's position in the ranking (ties broken by order)."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    hits = positive[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def found_at(scores: np.ndarray, positive: np.ndarray, shares: Sequence[float] = INSPECTED) -> dict[str, float]:
    """Share of the positives among the top ``share`` of the ranking, per share (keys "5%", ...)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    total = max(1, int(positive.sum()))
    return {f"{round(100 * s):d}%": float(positive[order[: int(round(s * len(order)))]].sum() / total)
            for s in shares}


def detection_metrics(scores: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """``{"auc", "ap", "found_at"}`` of a suspect ranking against known flipped labels."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != np.shape(positive):
        raise ShapeError(f"{scores.shape[0]} scores for {np.shape(positive)[0]} labels")
    if not np.isfinite(scores).all():
        raise TDAError("suspect scores contain NaN or inf; check the run's features")
    return {"auc": roc_auc(scores, positive), "ap": average_precision(scores, positive),
            "found_at": found_at(scores, positive)}


__all__ = ["INSPECTED", "average_precision", "detection_metrics", "flip_labels", "found_at", "rank_average",
           "roc_auc", "self_influence", "LossGradients", "loss_self_influence"]
