"""Containers for projected features and the protocol every feature source follows.

A feature source yields aligned blocks over the training set: for each block the example ids,
the features of every checkpoint and the loss weights ``Q`` of every checkpoint. The in-memory
:class:`ArrayFeatures` and the on-disk store (``stores.FeatureStore``) both implement it, so
scorers and the scoring kernel never know where features live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np

from tda.errors import ShapeError


@dataclass
class FeatureBlock:
    """Features of a block of b examples under M checkpoints.

    Attributes:
        ids: (b,) int64 example ids.
        feats: (M, b, k) float32 projected gradients.
        q: (M, b) float32 loss weights (ones when the task has none).
    """

    ids: np.ndarray
    feats: np.ndarray
    q: np.ndarray

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.feats = np.asarray(self.feats)
        self.q = np.asarray(self.q, dtype=np.float32)
        if self.feats.ndim != 3:
            raise ShapeError(f"features must be (M, b, k), got shape {self.feats.shape}")
        m, b, _ = self.feats.shape
        if self.ids.shape != (b,) or self.q.shape != (m, b):
            raise ShapeError(
                f"block shapes disagree: feats {self.feats.shape}, ids {self.ids.shape}, "
                f"q {self.q.shape}; expected ids ({b},) and q ({m}, {b})"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, rows: slice | np.ndarray) -> "FeatureBlock":
        return FeatureBlock(self.ids[rows], self.feats[:, rows], self.q[:, rows])


class FeatureSource(Protocol):
    """Anything that yields aligned :class:`FeatureBlock` s over a set of examples."""

    checkpoints: Sequence[int]

    def __len__(self) -> int: ...

    @property
    def k(self) -> int: ...

    def iter_blocks(self, block_rows: int = 4096) -> Iterator[FeatureBlock]: ...


class ArrayFeatures:
    """In-memory feature source over arrays (M, n, k) and (M, n)."""

    def __init__(self, block: FeatureBlock, checkpoints: Sequence[int]) -> None:
        if len(checkpoints) != block.feats.shape[0]:
            raise ShapeError(
                f"{len(checkpoints)} checkpoint ids for features of {block.feats.shape[0]} checkpoints"
            )
        self.block = block
        self.checkpoints = list(checkpoints)

    def __len__(self) -> int:
        return len(self.block)

    @property
    def k(self) -> int:
        return int(self.block.feats.shape[2])

    @property
    def ids(self) -> np.ndarray:
        return self.block.ids

    def iter_blocks(self, block_rows: int = 4096) -> Iterator[FeatureBlock]:
        for lo in range(0, len(self.block), block_rows):
            yield self.block.select(slice(lo, lo + block_rows))


def concat_blocks(blocks: Sequence[FeatureBlock]) -> FeatureBlock:
    """Join blocks along the example axis."""
    if not blocks:
        raise ShapeError("no feature blocks to join: the data set is empty")
    return FeatureBlock(
        np.concatenate([b.ids for b in blocks]),
        np.concatenate([b.feats for b in blocks], axis=1),
        np.concatenate([b.q for b in blocks], axis=1),
    )
