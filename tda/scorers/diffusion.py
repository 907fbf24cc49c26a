"""Scorers for diffusion models: D-TRAK, Diffusion-TracIn, Diffusion-ReTrac (docs/methods.md 3, 4).

- D-TRAK is TRAK (:class:`~tda.scorers.trak.TRAKScorer`, unchanged) on features from
  :class:`tda.featurizers.diffusion.DiffusionFeaturizer` in ``mode="mean"``: gradients of the selected
  output averaged over a seeded timestep grid on both sides, ``Q = -1`` for ``loss`` (so a
  positive score means training on i raises the query's loss) and 1 otherwise.
  :func:`make_dtrak_scorer` only names it.
- Diffusion-TracIn and Diffusion-ReTrac use ``mode="slots"`` features: per checkpoint c and draw
  s a slot ``[phi_c,s, n_c,s]`` with ``phi = P^T g / sqrt(d)`` and ``n = ||g||_2`` the exact norm
  of the full gradient. Train side: one slot, the gradient of the training loss ``L`` at the
  ``(t, eps)`` the example was trained with (recorded). Query side: S slots, gradients of the
  output ``f`` on a timestep grid times noise draws. With learning rates ``eta_c``:

      TracIn:  tau(z)_i = -sum_c eta_c < (1/S) sum_s phi_c,s(z),           phi_c,i >
      ReTrac:  tau(z)_i = -sum_c eta_c < (1/S) sum_s phi_c,s(z) / n_c,s(z), phi_c,i / n_c,i >

  The minus sign is the sign convention (docs/methods.md): a gradient step on the training loss of
  z_i, ``theta -= eta grad L(z_i)``, changes ``f(z)`` by ``-eta <grad f(z), grad L(z_i)>``, so a
  positive score means training on z_i raises f(z); with ``f = loss``, helpful examples (that
  lower the query's loss) have negative scores. Dividing projected gradients by the exact full
  norm equals projecting unit gradients (projection is linear). Zero gradients give zeros.

As transforms: train ``concat_c(-sqrt(eta_c) u_c,i)``, query ``concat_c(sqrt(eta_c) mean_s
u_c,s(z))`` with ``u = phi`` (TracIn) or ``phi / n`` (ReTrac): scored by :mod:`tda.core.kernel` and
served by the FAISS index like every scorer.

The generic TracInCP, Grad-Dot and Grad-Cos run on the same slot features through
:class:`SlotScorer` (train side the negated recorded-draw loss gradient, query side the mean
over draws); its ``tracin`` equals Diffusion-TracIn.

:func:`generally_influential` counts training examples in the top-k of many queries, the
failure of TracIn that ReTrac's normalisation addresses.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tda.errors import ConfigError, ShapeError
from tda.core.features import FeatureBlock, FeatureSource
from tda.scorers.base import Scorer
from tda.scorers.tracin import TracInCPScorer, check_finite_rows, concat_checkpoints
from tda.scorers.trak import DEFAULT_LAMBDA_REL, TRAKScorer


def make_dtrak_scorer(lambda_rel: float = DEFAULT_LAMBDA_REL, block_rows: int = 8192) -> TRAKScorer:
    """D-TRAK: a :class:`TRAKScorer` (named ``"dtrak"``) for grid-averaged diffusion features."""
    scorer = TRAKScorer(lambda_rel=lambda_rel, block_rows=block_rows)
    scorer.name = "dtrak"
    return scorer


def split_slots(feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Slot features (M, b, S*(k+1)) -> projected gradients (M, b, S, k) float64, norms (M, b, S).

    Raises:
        ShapeError: the width is not a multiple of k + 1.
    """
    m_count, b, width = feats.shape
    if width % (k + 1):
        raise ShapeError(
            f"diffusion slot features must be S*(k+1) wide with k={k}, got width {width}; featurize "
            "with DiffusionFeaturizer(mode='slots') and the same projection dimension"
        )
    slots = np.asarray(feats, dtype=np.float64).reshape(m_count, b, width // (k + 1), k + 1)
    return slots[..., :k], slots[..., k]


def _unit(phi: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``phi / n`` with zeros where ``n == 0``: (..., k), (...) -> (..., k)."""
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms[..., None] > 0, phi / safe[..., None], 0.0)


class DiffusionTracInScorer(TracInCPScorer):
    """Diffusion-TracIn: ``-sum_c eta_c <mean_s grad f_c,s(z), grad L_c(z_i)>`` (module docstring).

    Args:
        learning_rates: one step size per checkpoint.
        k: projection dimension of the slot features (each slot is k + 1 wide).
    """

    name = "diffusion-tracin"
    normalize = False

    def __init__(self, learning_rates: Sequence[float], k: int) -> None:
        super().__init__(learning_rates)
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.k = int(k)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "k": self.k}

    def fit(self, train: FeatureSource, progress: bool = False) -> "DiffusionTracInScorer":
        """Nothing to learn; checks the checkpoints and that train features have one slot."""
        super().fit(train)
        if train.k != self.k + 1:
            raise ShapeError(
                f"training features are {train.k} wide; Diffusion-TracIn needs one slot of k+1={self.k + 1} "
                "(the recorded training draw): featurize the training set with mode='slots' and one draw"
            )
        return self

    def _units(self, block: FeatureBlock) -> np.ndarray:
        self._check(block.feats.shape[0])
        phi, norms = split_slots(block.feats, self.k)  # (M, b, S, k), (M, b, S)
        return _unit(phi, norms) if self.normalize else phi

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        """(b, M*k) float32: ``concat_c(-sqrt(eta_c) u_c,i)``."""
        units = self._units(block)
        if units.shape[2] != 1:
            raise ShapeError(f"training features must have one slot (the trained draw), got {units.shape[2]}")
        out = concat_checkpoints(units[:, :, 0], -np.sqrt(self.learning_rates))
        return check_finite_rows(out, block.ids, f"{self.name} train vectors")

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        """(m, M*k) float32: ``concat_c(sqrt(eta_c) mean_s u_c,s(z))``."""
        out = concat_checkpoints(self._units(block).mean(axis=2), np.sqrt(self.learning_rates))
        return check_finite_rows(out, block.ids, f"{self.name} query vectors")


class DiffusionReTracScorer(DiffusionTracInScorer):
    """Diffusion-ReTrac: Diffusion-TracIn with unit train gradients and per-draw unit query
    gradients averaged (module docstring)."""

    name = "diffusion-retrac"
    normalize = True


class _SlotSource:
    """A feature source of slot features seen through a block transform (for :class:`SlotScorer`)."""

    def __init__(self, source: FeatureSource, transform: Any, k: int) -> None:
        self.source, self.transform, self._k, self.checkpoints = source, transform, k, source.checkpoints

    def __len__(self) -> int:
        return len(self.source)

    @property
    def k(self) -> int:
        return self._k

    def iter_blocks(self, block_rows: int = 4096):
        for blk in self.source.iter_blocks(block_rows):
            yield self.transform(blk)


class SlotScorer(Scorer):
    """A generic gradient scorer (TracInCP, Grad-Dot, Grad-Cos) on diffusion slot features.

    Slot features are turned into plain per-checkpoint features (M, b, k), then ``inner``'s own
    transforms apply. Train side: the single slot, the training loss's gradient at the recorded
    draw, *negated*: a step on ``L(z_i)`` changes ``f(z)`` by ``-eta <grad f(z), grad L(z_i)>``,
    so ``-grad L(z_i)`` plays the part of a training example's output gradient and the sign
    convention holds. Query side: the mean of the query's slots (the gradients of f on its grid
    draws). The exact norms are dropped. Hence, with phi the projected gradients:

        tracin:  -sum_c eta_c <mean_s phi_c,s(z), phi_c,i>        (equals Diffusion-TracIn)
        graddot: -(1/M) sum_c <mean_s phi_c,s(z), phi_c,i>
        gradcos: -(1/M) sum_c cos(mean_s phi_c,s(z), phi_c,i)     (vs ReTrac: normalised after averaging)

    Args:
        inner: the scorer applied to the plain features. k: projection dimension (slots are k + 1).
    """

    def __init__(self, inner: Scorer, k: int) -> None:
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.inner, self.k, self.name = inner, int(k), inner.name

    def _plain(self, block: FeatureBlock, side: str) -> FeatureBlock:
        phi, _ = split_slots(block.feats, self.k)  # (M, b, S, k)
        if side == "query":
            return FeatureBlock(block.ids, phi.mean(axis=2), block.q)
        if phi.shape[2] != 1:
            raise ShapeError(f"training features must have one slot (the trained draw), got {phi.shape[2]}; "
                             "featurize the training set with mode='slots' and one draw")
        return FeatureBlock(block.ids, -phi[:, :, 0], block.q)

    def fit(self, train: FeatureSource, progress: bool = False) -> "SlotScorer":
        self.inner.fit(_SlotSource(train, lambda b: self._plain(b, "train"), self.k), progress)
        return self

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        return self.inner.transform_train(self._plain(block, "train"))

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        return self.inner.transform_query(self._plain(block, "query"))

    def hyperparameters(self) -> dict[str, Any]:
        return {**self.inner.hyperparameters(), "k": self.k, "features": "diffusion-slots"}

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> "SlotScorer":
        self.inner.load_state_dict(state)
        return self


def generally_influential(top_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Training ids that appear in the top-k lists of more than ``fraction`` of the queries.

    Args:
        top_ids: (m, k) training ids per query (e.g. ``TopK.proponent_ids``).
        fraction: in [0, 1); an id counts when it is in more than ``fraction * m`` lists.

    Returns:
        Sorted (c,) int64 ids; ``len`` of it is the "generally influential" count.
    """
    top_ids = np.asarray(top_ids)
    if top_ids.ndim != 2:
        raise ShapeError(f"top_ids must be (m, k), got shape {top_ids.shape}")
    if not 0 <= fraction < 1:
        raise ConfigError(f"fraction must be in [0, 1), got {fraction}")
    per_query = np.concatenate([np.unique(row) for row in top_ids]) if len(top_ids) else np.array([], np.int64)
    ids, counts = np.unique(per_query, return_counts=True)
    return ids[counts > fraction * top_ids.shape[0]].astype(np.int64)


def influence_counts(query: FeatureBlock, train: FeatureSource, scorers: Mapping[str, Scorer], k: int,
                     fraction: float) -> dict[str, dict[str, Any]]:
    """Generally influential examples per scorer, for both ends of the ranking.

    Returns:
        ``{name: {"proponents": ids, "opponents": ids, "k": k, "fraction": fraction}}`` where
        proponents are the largest scores (raise f) and opponents the most negative (lower f).
    """
    from tda.core.kernel import top_k

    out = {}
    for name, scorer in scorers.items():
        top = top_k(query, scorer, train, k)
        out[name] = {"proponents": generally_influential(top.proponent_ids, fraction),
                     "opponents": generally_influential(top.opponent_ids, fraction), "k": k, "fraction": fraction}
    return out


__all__ = ["DiffusionReTracScorer", "DiffusionTracInScorer", "SlotScorer", "generally_influential",
           "influence_counts", "make_dtrak_scorer", "split_slots"]
