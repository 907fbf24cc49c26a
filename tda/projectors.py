"""Random projections of per-example gradients (METHODS.md section 2).

``phi = P^T g / sqrt(d)`` with ``P`` of shape (d, k), entries +-1 (Rademacher) or N(0, 1).
``P`` is the vertical stack of row blocks ``P_b`` (``block_rows`` x k), each generated from a
PCG64 stream seeded by ``(seed, checkpoint, b)`` alone: any process, on any machine, regenerates
the same matrix without storing it, and the whole d x k matrix is never materialised (unless
it fits the cache budget, where blocks are kept after first use). Products are accumulated in
fp32 (or fp64 when the gradients are fp64).

On CUDA the same blocks are used (generated on the CPU, cached on the device), so CPU and GPU
features agree. ``backend="fast_jl"`` uses traker's compiled CUDA kernel instead: a different
(but equally valid) Rademacher matrix, so its features must never be mixed with the dense ones;
the backend is part of :meth:`Projector.spec` for that reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, MissingDependencyError, ShapeError

logger = logging.getLogger(__name__)

_KINDS = ("rademacher", "gaussian")
_BACKENDS = ("auto", "dense", "fast_jl")
# Byte -> 8 signs lookup table: bit j of the byte gives sign j.
_SIGN_LUT = torch.tensor(
    [[1.0 if (v >> j) & 1 else -1.0 for j in range(8)] for v in range(256)], dtype=torch.float32
)


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that determines the projection matrix; stored in manifests and compared."""

    dim: int
    k: int
    seed: int
    kind: str
    block_rows: int
    backend: str


def default_block_rows(k: int) -> int:
    """Rows per block so one block holds about 4M entries (16 MB in fp32)."""
    return max(64, (1 << 22) // max(k, 1))


def _fast_jl_available() -> bool:
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return False
    return True


class Projector:
    """Blocked, seeded random projection from d to k dimensions.

    Args:
        dim: gradient dimension d.
        k: projection dimension.
        seed: base seed; the matrix of checkpoint c is a pure function of (seed, c).
        kind: ``"rademacher"`` or ``"gaussian"``.
        block_rows: rows of P per generated block (recorded in the spec).
        backend: ``"dense"`` (blocked GEMM, CPU or CUDA), ``"fast_jl"`` (traker's CUDA kernel)
            or ``"auto"`` (dense; fast_jl is never picked implicitly because its matrix
            differs from the dense one).
        cache_bytes: memory budget for keeping generated blocks between calls.
    """

    def __init__(
        self,
        dim: int,
        k: int,
        seed: int = 0,
        kind: str = "rademacher",
        block_rows: int | None = None,
        backend: str = "auto",
        cache_bytes: int = 4 << 30,
    ) -> None:
        if kind not in _KINDS:
            raise ConfigError(f"projector kind {kind!r} is unknown; use one of {_KINDS}")
        if backend not in _BACKENDS:
            raise ConfigError(f"projector backend {backend!r} is unknown; use one of {_BACKENDS}")
        if dim <= 0 or k <= 0:
            raise ConfigError(f"projection needs dim > 0 and k > 0, got dim={dim}, k={k}")
        if seed < 0:
            raise ConfigError(f"projection seed must be >= 0, got {seed}")
        if backend == "fast_jl":
            if not _fast_jl_available():
                raise MissingDependencyError(
                    "backend 'fast_jl' needs traker's CUDA kernel: pip install traker[fast]"
                    " on a machine with CUDA, or use backend 'dense'"
                )
            if kind != "rademacher" or k % 512:
                raise ConfigError("fast_jl supports kind 'rademacher' with k a multiple of 512")
        self.dim, self.k, self.seed, self.kind = dim, k, seed, kind
        self.block_rows = block_rows or default_block_rows(k)
        self.backend = "dense" if backend == "auto" else backend
        self.n_blocks = math.ceil(dim / self.block_rows)
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, int, str], Tensor] = {}
        self._cached_bytes = 0

    @property
    def spec(self) -> ProjectorSpec:
        return ProjectorSpec(self.dim, self.k, self.seed, self.kind, self.block_rows, self.backend)

    def spec_dict(self) -> dict:
        return asdict(self.spec)

    def block(self, checkpoint: int, b: int) -> Tensor:
        """Block ``b`` of P for ``checkpoint``: fp32 CPU tensor (rows_b, k). Pure function."""
        if not 0 <= b < self.n_blocks:
            raise ConfigError(f"block {b} out of range [0, {self.n_blocks})")
        if checkpoint < 0:
            raise ConfigError(f"checkpoint id must be >= 0, got {checkpoint}")
        rows = min(self.block_rows, self.dim - b * self.block_rows)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, checkpoint, b])))
        n = rows * self.k
        if self.kind == "gaussian":
            return torch.from_numpy(rng.standard_normal((rows, self.k), dtype=np.float32))
        raw = np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8).astype(np.int64)
        signs = torch.nn.functional.embedding(torch.from_numpy(raw), _SIGN_LUT)  # (n/8, 8)
        return signs.reshape(-1)[:n].reshape(rows, self.k)

    def matrix(self, checkpoint: int) -> Tensor:
        """The whole (d, k) matrix; for tests and small d only."""
        return torch.cat([self.block(checkpoint, b) for b in range(self.n_blocks)], dim=0)

    def _device_block(self, checkpoint: int, b: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (checkpoint, b, f"{device}:{dtype}")
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        blk = self.block(checkpoint, b).to(device=device, dtype=dtype)
        size = blk.numel() * blk.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = blk
            self._cached_bytes += size
        return blk

    def clear_cache(self) -> None:
        """Drop cached blocks (e.g. after the last batch of a checkpoint)."""
        self._cache.clear()
        self._cached_bytes = 0

    def project(self, grads: Tensor, checkpoint: int) -> Tensor:
        """Project per-example gradients.

        Args:
            grads: (B, d) gradients, fp16/bf16/fp32/fp64, on CPU or CUDA.
            checkpoint: checkpoint id selecting the matrix.

        Returns:
            (B, k) features, fp32 (fp64 for fp64 input), on the gradients' device.
        """
        if grads.ndim != 2 or grads.shape[1] != self.dim:
            raise ShapeError(
                f"projector expects gradients of shape (B, {self.dim}), got "
                f"{tuple(grads.shape)}; the projector and the parameter selection disagree"
            )
        if self.backend == "fast_jl":
            return self._project_fast_jl(grads, checkpoint)
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        out = torch.zeros(grads.shape[0], self.k, dtype=dtype, device=grads.device)
        for b in range(self.n_blocks):
            lo = b * self.block_rows
            hi = min(lo + self.block_rows, self.dim)
            blk = self._device_block(checkpoint, b, grads.device, dtype)
            out.addmm_(grads[:, lo:hi].to(dtype), blk)
        return out.div_(math.sqrt(self.dim))

    def _project_fast_jl(self, grads: Tensor, checkpoint: int) -> Tensor:
        import fast_jl

        if not grads.is_cuda:
            raise ConfigError("backend 'fast_jl' needs gradients on a CUDA device")
        seed = int(np.random.SeedSequence([self.seed, checkpoint]).generate_state(1)[0] >> 1)
        n = grads.shape[0]
        width = 8 if n <= 8 else 16 if n <= 16 else 32  # kernel variants by batch width
        n_sms = torch.cuda.get_device_properties(grads.device).multi_processor_count
        fn = getattr(fast_jl, f"project_rademacher_{width}")
        out = fn(grads.float().contiguous(), self.k, seed, n_sms)
        return out.float().div_(math.sqrt(self.dim))
