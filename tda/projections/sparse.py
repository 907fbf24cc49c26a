"""Sparse Johnson-Lindenstrauss projection (SJLT, the CountSketch family; docs/methods.md section 2).

Each gradient coordinate ``j`` is sent to ``s`` of the ``k`` outputs with random signs: the
outputs are split into ``s`` segments of ``k / s``, and in segment ``t`` coordinate ``j`` lands
in bucket ``h_t(j)`` with sign ``sigma_t(j)``. So

    phi = sqrt(k / (s d)) * S^T g,    S[j, t k/s + h_t(j)] = sigma_t(j),

which costs ``O(d s)`` per example instead of the dense ``O(d k)``, and has the dense
projector's scale (``E ||phi||^2 = k ||g||^2 / d``, as ``P^T g / sqrt(d)`` with +-1 entries) so
ridges and scores mean the same for both. With independent buckets and signs the variance of an
inner product is that of the dense Rademacher projection,
``Var(phi_a . phi_b) = (k / d^2) (|a|^2 |b|^2 + (a.b)^2 - 2 sum_i a_i^2 b_i^2)``, for every ``s``;
a larger ``s`` only thins the tails when a few coordinates dominate.

Buckets and signs of coordinate block ``b`` (``block_rows`` coordinates) are drawn from a PCG64
stream seeded by ``(seed, checkpoint, b)`` alone, so any process regenerates them; they take
``s d`` int64 + ``s d`` float32 per checkpoint and are cached per device. The sums run as
``scatter_add_`` in fp32 (fp64 for fp64 gradients), on the CPU or on CUDA alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from tda.errors import ConfigError, ShapeError

#: Coordinates per hash block (the unit of regeneration; recorded in the spec).
DEFAULT_BLOCK_ROWS = 1 << 20


@dataclass(frozen=True)
class SparseProjectorSpec:
    """Everything that determines the sparse projection; stored in manifests and compared."""

    dim: int
    k: int
    seed: int
    kind: str
    nonzeros: int
    block_rows: int
    backend: str = "sparse"
    precision: str = "fp32"


class SparseProjector:
    """Seeded SJLT from d to k dimensions with ``nonzeros`` (s) entries per input coordinate.

    The interface of :class:`tda.projections.projectors.Projector` (``project``, ``spec``, ``spec_dict``,
    ``clear_cache``), so :class:`tda.featurizers.gradient.Featurizer` takes either.

    Args:
        dim: gradient dimension d. k: projection dimension (a multiple of ``nonzeros``).
        seed: base seed; the sketch of checkpoint c is a pure function of (seed, c).
        nonzeros: s, entries per input coordinate (1 is CountSketch).
        block_rows: coordinates per hash block.
        cache_bytes: memory budget for hashes kept between calls (per checkpoint and device).
    """

    kind = "sjlt"

    def __init__(self, dim: int, k: int, seed: int = 0, nonzeros: int = 1,
                 block_rows: int = DEFAULT_BLOCK_ROWS, cache_bytes: int = 1 << 30) -> None:
        if dim <= 0 or k <= 0:
            raise ConfigError(f"projection needs dim > 0 and k > 0, got dim={dim}, k={k}")
        if nonzeros < 1 or k % nonzeros:
            raise ConfigError(f"the sparse projection needs k ({k}) to be a multiple of nonzeros ({nonzeros}), "
                              "nonzeros >= 1; change one of them")
        if seed < 0:
            raise ConfigError(f"projection seed must be >= 0, got {seed}")
        self.dim, self.k, self.seed, self.nonzeros = dim, k, seed, nonzeros
        self.block_rows = block_rows
        self.n_blocks = math.ceil(dim / block_rows)
        self.segment = k // nonzeros
        self.backend, self.precision = "sparse", "fp32"
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    @property
    def spec(self) -> SparseProjectorSpec:
        return SparseProjectorSpec(self.dim, self.k, self.seed, self.kind, self.nonzeros, self.block_rows)

    def spec_dict(self) -> dict:
        return asdict(self.spec)

    def hashes(self, checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """``(columns, signs)``, both (s, d): output column (int64, already offset by its segment)
        and sign (+-1 int8) of every coordinate in every segment. Pure function of (seed, checkpoint)."""
        if checkpoint < 0:
            raise ConfigError(f"checkpoint id must be >= 0, got {checkpoint}")
        s = self.nonzeros
        cols = np.empty((s, self.dim), dtype=np.int64)
        signs = np.empty((s, self.dim), dtype=np.int8)
        for b in range(self.n_blocks):
            lo, hi = b * self.block_rows, min((b + 1) * self.block_rows, self.dim)
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, checkpoint, b])))
            cols[:, lo:hi] = rng.integers(0, self.segment, size=(s, hi - lo), dtype=np.int64)
            signs[:, lo:hi] = rng.integers(0, 2, size=(s, hi - lo), dtype=np.int8) * 2 - 1
        cols += (np.arange(s, dtype=np.int64) * self.segment)[:, None]
        return cols, signs

    def matrix(self, checkpoint: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """The explicit (d, k) matrix ``sqrt(k / (s d)) S``; for tests and small d only."""
        cols, signs = self.hashes(checkpoint)
        m = torch.zeros(self.dim, self.k, dtype=dtype)
        rows = torch.arange(self.dim)
        for t in range(self.nonzeros):
            m[rows, torch.from_numpy(cols[t])] += torch.from_numpy(signs[t]).to(dtype)
        return m * math.sqrt(self.k / (self.nonzeros * self.dim))

    def _device_hashes(self, checkpoint: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (checkpoint, f"{device}:{dtype}")
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cols, signs = self.hashes(checkpoint)
        pair = (torch.from_numpy(cols).to(device), torch.from_numpy(signs).to(device=device, dtype=dtype))
        if (cols.nbytes + signs.nbytes * 4) * (len(self._cache) + 1) <= self.cache_bytes:
            self._cache[key] = pair
        return pair

    def clear_cache(self) -> None:
        """Drop cached hashes (e.g. after the last batch of a checkpoint)."""
        self._cache.clear()

    def project(self, grads: Tensor, checkpoint: int) -> Tensor:
        """Project per-example gradients (B, d) on CPU or CUDA; returns (B, k) fp32 (fp64 for
        fp64 input) on the gradients' device."""
        if grads.ndim != 2 or grads.shape[1] != self.dim:
            raise ShapeError(
                f"projector expects gradients of shape (B, {self.dim}), got "
                f"{tuple(grads.shape)}; the projector and the parameter selection disagree"
            )
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        cols, signs = self._device_hashes(checkpoint, grads.device, dtype)
        g = grads.to(dtype)
        n = g.shape[0]
        out = torch.zeros(n, self.k, dtype=dtype, device=g.device)
        buf = torch.empty_like(g) if self.nonzeros > 1 or g.data_ptr() == grads.data_ptr() else g
        for t in range(self.nonzeros):
            torch.mul(g, signs[t], out=buf)
            out.scatter_add_(1, cols[t].expand(n, self.dim), buf)
        return out.mul_(math.sqrt(self.k / (self.nonzeros * self.dim)))
