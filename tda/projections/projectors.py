"""Random projections of per-example gradients (docs/methods.md section 2).

``phi = P^T g / sqrt(d)`` with ``P`` of shape (d, k), entries +-1 (Rademacher) or N(0, 1).
``P`` is the vertical stack of row blocks ``P_b`` (``block_rows`` x k), each generated from a
PCG64 stream seeded by ``(seed, checkpoint, b)`` alone: any process, on any machine, regenerates
the same matrix without storing it, and the whole d x k matrix is never materialised in the
compute dtype: panels of P within the cache budget are kept after first use as int8 (+-1
entries, a quarter of fp32; Gaussian ones in the compute dtype) and widened into one reused
scratch panel per GEMM, the others regenerated (a table lookup per random byte, ~5e8
entries/s on two cores). Products are accumulated in fp32 (or fp64 when the gradients are fp64).

On CUDA the same blocks are used (generated on the CPU, cached on the device), so CPU and GPU
features agree. ``backend="fast_jl"`` uses traker's compiled CUDA kernel instead: a different
(but equally valid) Rademacher matrix, so its features must never be mixed with the dense ones;
the backend is part of :meth:`Projector.spec` for that reason. :class:`tda.featurizers.gradient.Featurizer`
resolves ``backend="auto"`` to ``fast_jl`` when the model is on CUDA and the kernel imports.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from tda.errors import ConfigError, MissingDependencyError, ShapeError
from tda.projections.sparse import SparseProjector

logger = logging.getLogger(__name__)

_KINDS = ("rademacher", "gaussian")
_BACKENDS = ("auto", "dense", "fast_jl")
_PRECISIONS = ("fp32", "bf16")
# Bit j of each random byte gives sign j of its 8 entries: 1 -> +1, 0 -> -1. A byte's 8 signs
# as int8, packed into one uint64 per byte value: one table lookup unpacks 8 entries.
_SIGNS8 = (((np.arange(256)[:, None] >> np.arange(8)) & 1) * 2 - 1).astype(np.int8).view(np.uint64).reshape(256)
# Rows of P multiplied per GEMM call: several generation blocks side by side (~16M entries).
_PANEL_ENTRIES = 1 << 24


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that determines the projection matrix; stored in manifests and compared."""

    dim: int
    k: int
    seed: int
    kind: str
    block_rows: int
    backend: str
    precision: str = "fp32"


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
        precision: ``"fp32"`` (default; fp32 products, fp64 for fp64 gradients) or ``"bf16"``
            (gradients rounded to bfloat16 and multiplied by the same +-1 matrix, about 2-3x
            faster on CPUs with AVX512-BF16 and on GPUs, relative feature error ~3e-3, far below
            the projection's own distortion ~1/sqrt(k); Gaussian entries are rounded too).
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
        precision: str = "fp32",
    ) -> None:
        if precision not in _PRECISIONS:
            raise ConfigError(f"projector precision {precision!r} is unknown; use one of {_PRECISIONS}")
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
        self.precision = precision
        self.blocks_per_panel = max(1, _PANEL_ENTRIES // (self.block_rows * k))
        self.n_panels = math.ceil(self.n_blocks / self.blocks_per_panel)
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, int, str], Tensor] = {}
        self._cached_bytes = 0
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @property
    def spec(self) -> ProjectorSpec:
        return ProjectorSpec(self.dim, self.k, self.seed, self.kind, self.block_rows, self.backend, self.precision)

    def spec_dict(self) -> dict:
        return asdict(self.spec)

    def block(self, checkpoint: int, b: int, dtype: torch.dtype = torch.float32,
              out: Tensor | None = None) -> Tensor:
        """Block ``b`` of P for ``checkpoint``: CPU tensor (rows_b, k). Pure function.

        Rademacher entries are exact in any dtype; ``dtype`` is float32, bfloat16, float64 or
        (Rademacher only) int8, the form the cache keeps.
        ``out``: a contiguous CPU (rows_b, k) tensor of ``dtype`` to write into (no allocation).
        """
        if not 0 <= b < self.n_blocks:
            raise ConfigError(f"block {b} out of range [0, {self.n_blocks})")
        if checkpoint < 0:
            raise ConfigError(f"checkpoint id must be >= 0, got {checkpoint}")
        rows = min(self.block_rows, self.dim - b * self.block_rows)
        if out is None:
            out = torch.empty(rows, self.k, dtype=dtype)
        elif out.shape != (rows, self.k) or out.dtype != dtype or not out.is_contiguous() or out.is_cuda:
            raise ShapeError(f"block output must be a contiguous CPU ({rows}, {self.k}) {dtype} tensor")
        if dtype == torch.int8 and self.kind != "rademacher":
            raise ConfigError("only Rademacher blocks can be generated as int8")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, checkpoint, b])))
        n = rows * self.k
        if self.kind == "gaussian":
            return out.copy_(torch.from_numpy(rng.standard_normal((rows, self.k), dtype=np.float32)))
        signs = _SIGNS8[np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8)].view(np.int8)[:n]
        return out.copy_(torch.from_numpy(signs).reshape(rows, self.k))  # exact in every dtype

    def matrix(self, checkpoint: int) -> Tensor:
        """The whole (d, k) matrix; for tests and small d only."""
        return torch.cat([self.block(checkpoint, b) for b in range(self.n_blocks)], dim=0)

    def _panel_rows(self, p: int) -> tuple[int, int]:
        lo = p * self.blocks_per_panel * self.block_rows
        return lo, min(lo + self.blocks_per_panel * self.block_rows, self.dim)

    def _storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What the cache keeps: +-1 entries as int8 (a quarter of fp32), Gaussian ones as used."""
        return torch.int8 if self.kind == "rademacher" else dtype

    def matrix_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the whole of P takes in the cache (int8 for Rademacher entries)."""
        return self.dim * self.k * torch.empty((), dtype=self._storage_dtype(dtype)).element_size()

    def _panel(self, checkpoint: int, p: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Rows ``_panel_rows(p)`` of P (several blocks), on ``device`` in ``dtype``.

        Panels within ``cache_bytes`` are kept in their storage dtype (int8 for +-1 entries) and
        widened into one scratch buffer per use (a fast, exact conversion); the others are
        generated into the scratch buffer every call."""
        store = self._storage_dtype(dtype)
        key = (checkpoint, p, f"{device}:{store}")
        panel = self._cache.get(key)
        if panel is None:
            panel = self._generate(key, device, store, dtype)
        return panel if panel.dtype == dtype else self._widen(panel, dtype)

    def _generate(self, key: tuple[int, int, str], device: torch.device, store: torch.dtype,
                  dtype: torch.dtype) -> Tensor:
        """Panel ``key`` generated: kept in the cache while it fits, else (on the CPU) straight
        into the widened scratch buffer."""
        checkpoint, p, _ = key
        lo, hi = self._panel_rows(p)
        first = p * self.blocks_per_panel
        size = (hi - lo) * self.k * torch.empty((), dtype=store).element_size()
        keep = self._cached_bytes + size <= self.cache_bytes
        if not keep and device.type == "cpu":
            return self._fill(checkpoint, first, lo, hi, self._scratch_for(hi - lo, dtype, device))
        panel = self._fill(checkpoint, first, lo, hi, torch.empty(hi - lo, self.k, dtype=store)).to(device)
        if keep:
            self._cache[key] = panel
            self._cached_bytes += size
        return panel

    def _fill(self, checkpoint: int, first: int, lo: int, hi: int, panel: Tensor) -> Tensor:
        for b in range(first, min(first + self.blocks_per_panel, self.n_blocks)):
            r0 = b * self.block_rows - lo
            r1 = min(r0 + self.block_rows, hi - lo)
            self.block(checkpoint, b, panel.dtype, out=panel[r0:r1])
        return panel

    def _scratch_for(self, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """One reused (rows, k) buffer per dtype and device (no allocation, no page faults per call)."""
        buf = self._scratch.get((device, dtype))
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(self.blocks_per_panel * self.block_rows, self.k, dtype=dtype, device=device)
            self._scratch[(device, dtype)] = buf
        return buf[:rows]

    def _widen(self, panel: Tensor, dtype: torch.dtype) -> Tensor:
        return self._scratch_for(panel.shape[0], dtype, panel.device).copy_(panel)

    def clear_cache(self) -> None:
        """Drop cached blocks (e.g. after the last batch of a checkpoint)."""
        self._cache.clear()
        self._scratch = {}
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
        if grads.dtype == torch.float64:
            dtype = torch.float64
        else:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out = torch.zeros(grads.shape[0], self.k, dtype=out_dtype, device=grads.device)
        g = grads.to(dtype)
        for p in range(self.n_panels):
            lo, hi = self._panel_rows(p)
            panel = self._panel(checkpoint, p, grads.device, dtype)
            if dtype == out_dtype:
                out.addmm_(g[:, lo:hi], panel)
            else:
                out.add_(g[:, lo:hi] @ panel)
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


def make_projector(projection: str, dim: int, k: int, seed: int, kind: str, backend: str, cache_bytes: int,
               precision: str, nonzeros: int, device: torch.device) -> "Projector | SparseProjector":
    """The dense or sparse projector of a :class:`tda.featurizers.gradient.Featurizer` (``backend="auto"``
    resolved to ``fast_jl`` on CUDA when the kernel imports)."""
    if projection == "sparse":
        if precision != "fp32":
            raise ConfigError("the sparse projection runs in fp32 only (it is memory-bound, bf16 gains nothing); "
                              "use precision 'fp32' or the dense projection")
        return SparseProjector(dim, k, seed, nonzeros, cache_bytes=cache_bytes)
    if projection != "dense":
        raise ConfigError(f"projection {projection!r} is unknown for Featurizer; use 'dense' or 'sparse' "
                          "(the factored projection is tda.featurizers.factored.FactoredFeaturizer)")
    if (backend == "auto" and device.type == "cuda" and kind == "rademacher" and k % 512 == 0
            and precision == "fp32" and _fast_jl_available()):
        backend = "fast_jl"  # traker's CUDA kernel; recorded in the spec, never mixed with dense
    return Projector(dim, k, seed, kind, backend=backend, cache_bytes=cache_bytes, precision=precision)
