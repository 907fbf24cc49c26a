"""TensorSketch projection of per-layer gradients from captured layers (Pham & Pagh 2013;
docs/methods.md section 2).

For a layer applied at positions t (tokens, output pixels of a convolution, one position for a
plain MLP) the per-example gradient is ``G = sum_t delta_t a_t^T`` (``d_out x d_in``, ``a_t``
with the bias ones column, exactly as :func:`tda.gradients.captures.layer_matrices` returns it). Its
sketch is the CountSketch of ``vec(G)`` under the hash and sign

    h(i, j) = (h_out(i) + h_in(j)) mod k,    s(i, j) = s_out(i) s_in(j),

    phi_c = sqrt(k / d) * sum_{i, j: h(i, j) = c} s(i, j) G_ij,

with ``h_in, s_in`` (``d_in``) and ``h_out, s_out`` (``d_out``) uniform buckets in ``[0, k)``
and random signs. It is computed without forming ``G``: the CountSketch of an outer product
``delta a^T`` is the circular convolution of the CountSketches of ``a`` and ``delta``, so

    TS(G) = irfft( sum_t rfft(CS_in(a_t)) * rfft(CS_out(delta_t)) )          (length k)

at ``O(T (d_in + d_out + k log k))`` per example and layer; when cheaper (few positions and a
small ``d_in d_out``, e.g. a convolution's many pixels against a small kernel) ``G`` is formed
(``O(T d_in d_out)``) and scattered with the combined hash instead: the same sketch, up to
rounding. Every selected layer sketches into the SAME ``k`` outputs with its own independent
hashes (the sum over layers), so the width is ``k`` whatever the model, as for the dense and
sparse projections.

Moments: for two distinct coordinates the combined bucket collides with probability ``1 / k``
and the product of signs has mean zero, so ``E <phi, phi'> = (k / d) <g, g'>`` with ``d`` the
number of covered gradient coordinates: the dense projector's ``P^T g / sqrt(d)`` scale, so
ridges and TracIn scales mean the same thing. The signs are only pairwise independent across
coordinates sharing a row or column of ``G``, so the variance is somewhat above CountSketch's
(Pham & Pagh bound it by a constant factor); unlike the factored projection its error shrinks
with the full ``k``, not with per-layer factors of ``sqrt(k)``.

Coverage (:func:`tda.projections.sketch_layers.tensorsketch_selection`): the factored projection's layers
(nn.Linear, transformers' Conv1D, nn.Conv2d with groups=1), embeddings and per-channel affine
norms; any other trainable parameter under the selection is refused. An embedding's gradient
``sum_t onehot(id_t) delta_t^T`` is the term with ``a_t = onehot(id_t)``, whose CountSketch is
the single bucket ``h_out(id_t)`` (rows = ids): entry ``(id_t, j)`` is scattered straight to
``(h_out(id_t) + h_in(j)) mod k`` with sign ``s_out(id_t) s_in(j)``, no FFT. A weight shared by an
embedding and linear layers (a tied LM head) is hashed by the parameter's name in every use, so
its sketch is that of the sum of the uses' gradients and ``d`` counts it once. A norm's weight
(``sum_t delta_t * xhat_t``) and bias (``sum_t delta_t``) are formed per example and
CountSketched with hashes of their own. ``d`` is the total covered dimension.

Buckets and signs of one layer side come from a numpy PCG64 stream seeded by ``(seed,
checkpoint, crc32(layer name), side)`` (the parameter's name for embeddings and shared
weights; side 2 for a vector), so any process regenerates them; they are cached per device and
dtype. Sums run in fp32 (fp64 for fp64 captures) with ``torch.fft`` on the CPU or on CUDA alike.

By default a batch is summed with few, large operations (:mod:`tda.projections.sketch_batch`:
signed formed gradients of many layers scattered together, embeddings without ``mod k``);
``batched=False`` sums one layer at a time, the same features up to rounding.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from tda.errors import ConfigError, ShapeError
from tda.gradients.captures import (CHUNK_ELEMENTS, MATRIX_LAYOUTS, NORM_LAYOUTS, SIDES, CapturedLayers, Captures, LayerSpec,
                       regroup)
from tda.projections.sketch_batch import (WORKSPACE_ELEMENTS, SketchBatch, count_sketch, embedding_entries, formed_into,
                                         plain_matrices, sketch_fft, sketch_formed, spectrum)
from tda.projections.sketch_layers import covered_sizes, embedding_sketch, norm_grads, shared_sq_norm, term_sq_norm

#: Relative costs per element against one multiply-add of forming ``G`` by batched matmul,
#: measured on the CPU (torch 2.13; ``benchmarks/tensorsketch_paths.py`` times both ways per
#: layer shape and prints the implied constants): writing and scattering an element, and one
#: ``log2 k`` step of a length-k real FFT plus its share of the product (FFT_COST was 5 until the
#: transformer shapes were measured: FFTs cost 4-6x the formed path at k = 4096).
SCATTER_COST = 60.0
FFT_COST = 25.0
_METHODS = ("auto", "fft", "form")
#: Seed-stream side of a CountSketched vector parameter (a norm's weight or bias, a tied layer's bias).
VECTOR = 2


@dataclass(frozen=True)
class TensorSketchSpec:
    """Everything that determines the tensorsketch features; stored in manifests and compared."""

    projection: str
    layers: tuple[str, ...]
    seed: int
    k: int
    dim: int
    params: tuple[str, ...]


class TensorSketchProjector(CapturedLayers):
    """TensorSketch of the selected layers' gradients into ``k`` shared outputs.

    The interface of :class:`tda.featurizers.factored.FactoredProjector` (``project(captures, checkpoint)``,
    ``grad_norms``, ``spec``, ``spec_dict``, ``clear_cache``), so
    :class:`tda.featurizers.factored.FactoredFeaturizer` takes either (``projection="tensorsketch"``).

    Args:
        layers: the layers (see :func:`tda.featurizers.factored.factored_selection`).
        k: projection dimension (the feature width). seed: base seed.
        method: ``"auto"`` (per layer and batch the cheaper of the two ways), ``"fft"`` or
            ``"form"`` (force one; same features up to rounding, for tests and benchmarks).
        batched: sum a batch with few large operations (:mod:`tda.projections.sketch_batch`: the
            formed layers' signed gradients scattered together); ``False``: one layer at a time
            (the reference; same features up to rounding).
    """

    #: elements of the batched path's reused workspace (see :data:`tda.projections.sketch_batch.WORKSPACE_ELEMENTS`)
    workspace_elements = WORKSPACE_ELEMENTS

    def __init__(self, layers: Sequence[LayerSpec], k: int = 1024, seed: int = 0, method: str = "auto",
                 batched: bool = True) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"tensorsketch k must be an integer >= 1, got {k!r}")
        if isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"projection seed must be >= 0, got {seed}")
        if method not in _METHODS:
            raise ConfigError(f"tensorsketch method {method!r} is unknown; use one of {_METHODS}")
        if not layers:
            raise ConfigError("the tensorsketch projection needs at least one layer")
        self.layers, self.k, self.seed, self.method = list(layers), int(k), int(seed), method
        self.sizes = covered_sizes(self.layers)  # covered parameter -> entries, a shared weight once
        self.dim = sum(self.sizes.values())
        self.scale = math.sqrt(self.k / self.dim)
        self.batched = bool(batched)
        self._wrap = any(s.layout == "embedding" for s in self.layers)  # buckets up to 2k: see SketchBatch
        self._bound = sum(s.d_in * s.d_out if s.layout in MATRIX_LAYOUTS else s.d_out * len(s.params)
                          for s in self.layers if s.layout != "embedding")  # workspace columns a batch can use
        self._cache: dict[tuple, Any] = {}
        self._work: dict[tuple, Tensor] = {}

    @property
    def spec(self) -> TensorSketchSpec:
        return TensorSketchSpec("tensorsketch", tuple(s.name for s in self.layers), self.seed, self.k, self.dim,
                                tuple(self.sizes))

    def spec_dict(self) -> dict[str, Any]:
        d = asdict(self.spec)
        d["layers"], d["params"] = list(d["layers"]), list(d["params"])
        return d

    def _stream(self, checkpoint: int, label: str, side: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        if checkpoint < 0:
            raise ConfigError(f"checkpoint id must be >= 0, got {checkpoint}")
        seq = np.random.SeedSequence([self.seed, checkpoint, zlib.crc32(label.encode()), side])
        rng = np.random.Generator(np.random.PCG64(seq))
        buckets = rng.integers(0, self.k, size=d, dtype=np.int64)
        signs = rng.integers(0, 2, size=d, dtype=np.int8) * 2 - 1
        return buckets, signs

    def hashes(self, checkpoint: int, layer: LayerSpec, side: str) -> tuple[np.ndarray, np.ndarray]:
        """``(buckets, signs)`` of one layer side: (d,) int64 in ``[0, k)`` and (d,) +-1 int8,
        ``d = d_in`` (bias column last) or ``d_out``. Pure function of (seed, checkpoint, layer name, side);
        a layer with a ``key`` (embeddings, shared weights) is hashed by the parameter's name instead,
        ``in`` = the weight's columns, ``out`` = its rows (ids), and a bias column of its own."""
        d = layer.d_in if side == "in" else layer.d_out
        key = getattr(layer, "key", None)
        if key is None:
            return self._stream(checkpoint, layer.name, SIDES[side], d)
        extra = side == "in" and layer.bias
        buckets, signs = self._stream(checkpoint, key, SIDES[side], d - int(extra))
        if extra:
            hb, sb = self.vector_hashes(checkpoint, f"{layer.name}.bias", 1)
            buckets, signs = np.concatenate([buckets, hb]), np.concatenate([signs, sb])
        return buckets, signs

    def vector_hashes(self, checkpoint: int, param: str, d: int) -> tuple[np.ndarray, np.ndarray]:
        """CountSketch ``(buckets, signs)`` of a vector parameter (a norm's weight or bias): (d,) each,
        a pure function of (seed, checkpoint, parameter name)."""
        return self._stream(checkpoint, param, VECTOR, d)

    def _vector(self, checkpoint: int, param: str, d: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (checkpoint, param, "vector", str(like.device), like.dtype)
        if key not in self._cache:
            buckets, signs = self.vector_hashes(checkpoint, param, d)
            self._cache[key] = (torch.from_numpy(buckets).to(like.device),
                                torch.from_numpy(signs).to(like.device, like.dtype))
        return self._cache[key]

    def _side(self, checkpoint: int, layer: LayerSpec, side: str, like: Tensor) -> tuple[Tensor, Tensor]:
        """Buckets and signs of ``side`` ("in", "out", "formed": the combined (d_out d_in,) hash of
        :func:`sketch_formed`, row-major over ``G``, or "formed_t": the same over ``G^T``,
        (d_in d_out,)) on ``like``'s device and dtype, cached."""
        key = (checkpoint, layer.name, side, str(like.device), like.dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if side in ("formed", "formed_t"):
            (h_in, s_in), (h_out, s_out) = (self._side(checkpoint, layer, s, like) for s in ("in", "out"))
            if side == "formed_t":
                (h_in, s_in), (h_out, s_out) = (h_out, s_out), (h_in, s_in)
            cols = (h_out[:, None] + h_in[None, :]) % self.k  # row-major as G (G^T)
            pair = (cols.reshape(-1), (s_out[:, None] * s_in[None, :]).reshape(-1))
        else:
            buckets, signs = self.hashes(checkpoint, layer, side)
            pair = (torch.from_numpy(buckets).to(like.device), torch.from_numpy(signs).to(like.device, like.dtype))
        self._cache[key] = pair
        return pair

    def _row_signs(self, checkpoint: int, layer: LayerSpec, like: Tensor) -> tuple[Tensor, Tensor]:
        """An embedding's row buckets and signs, the sign 0 on its padding row, cached."""
        key = (checkpoint, layer.name, "rows", str(like.device), like.dtype)
        if key not in self._cache:
            buckets, signs = self._side(checkpoint, layer, "out", like)
            if layer.padding_idx >= 0:
                signs = signs.clone()
                signs[layer.padding_idx] = 0
            self._cache[key] = (buckets, signs)
        return self._cache[key]

    def _group_index(self, checkpoint: int, like: Tensor, keys: tuple, parts: list[Tensor]) -> Tensor:
        """The buckets of a group of layers scattered together, concatenated, cached."""
        key = (checkpoint, "group", keys, str(like.device))
        if key not in self._cache:
            self._cache[key] = torch.cat(parts)
        return self._cache[key]

    def _workspace(self, like: Tensor, n: int) -> Tensor:
        """A flat scratch tensor of at least ``n`` elements of ``like``'s dtype and device, reused."""
        key = (str(like.device), like.dtype)
        work = self._work.get(key)
        if work is None or work.numel() < n:
            work = self._work[key] = like.new_empty(n)
        return work

    def clear_cache(self) -> None:
        """Drop cached hashes and the workspace (e.g. after the last batch of a checkpoint)."""
        self._cache.clear()
        self._work.clear()

    def path(self, layer: LayerSpec, positions: int) -> str:
        """``"fft"`` or ``"form"``: the cheaper way to sketch ``layer`` seen at ``positions``
        positions per example (or the forced :attr:`method`)."""
        if self.method != "auto":
            return self.method
        d_in, d_out = layer.d_in, layer.d_out
        form = d_in * d_out * (positions + SCATTER_COST)
        fft = positions * (SCATTER_COST * (d_in + d_out) + FFT_COST * self.k * max(1.0, math.log2(self.k)))
        return "form" if form <= fft else "fft"

    def _sketch_layer(self, layer: LayerSpec, a: Tensor, delta: Tensor, checkpoint: int,
                      acc: dict[str, Tensor]) -> None:
        """Add one layer's unscaled sketch of ``sum_t delta_t a_t^T`` to ``acc``, in chunks of
        examples: formed ones to ``acc["real"]`` (B, k), FFT ones to their spectrum
        ``acc["spectrum"]`` (B, k // 2 + 1), so all FFT layers share one inverse transform."""
        b, n = a.shape[:2]
        method = self.path(layer, n)
        per_example = layer.d_in * layer.d_out if method == "form" else n * (self.k + 2)
        step = max(1, CHUNK_ELEMENTS // max(per_example, 1))
        key = "real" if method == "form" else "spectrum"
        if key not in acc:
            acc[key] = (a.new_zeros(b, self.k) if method == "form" else
                        torch.zeros(b, self.k // 2 + 1, dtype=torch.complex128 if a.dtype == torch.float64
                                    else torch.complex64, device=a.device))
        if method == "form":
            sides: tuple = self._side(checkpoint, layer, "formed", a)
        else:
            sides = (self._side(checkpoint, layer, "in", a), self._side(checkpoint, layer, "out", a))
        fn = sketch_formed if method == "form" else spectrum
        for lo in range(0, b, step):
            acc[key][lo: lo + step] += fn(a[lo: lo + step], delta[lo: lo + step], *sides, self.k)

    def _sketch_term(self, layer: LayerSpec, a: Tensor, delta: Tensor, checkpoint: int,
                     acc: dict[str, Tensor]) -> None:
        """Add an embedding's or a norm's unscaled sketch to ``acc["real"]`` (B, k), in chunks of examples."""
        if "real" not in acc:
            acc["real"] = delta.new_zeros(delta.shape[0], self.k)
        if layer.layout in NORM_LAYOUTS:
            for param, g in zip(layer.params, norm_grads(layer, a, delta)):
                acc["real"] += count_sketch(g, *self._vector(checkpoint, param, layer.d_out, g), self.k)
            return
        rows, cols = self._side(checkpoint, layer, "out", delta), self._side(checkpoint, layer, "in", delta)
        step = max(1, CHUNK_ELEMENTS // max(a.shape[1] * layer.d_in, 1))
        for lo in range(0, a.shape[0], step):
            acc["real"][lo: lo + step] += embedding_sketch(a[lo: lo + step], delta[lo: lo + step], rows, cols,
                                                           self.k, layer.padding_idx)

    def grad_norms(self, captures: Captures, group: int = 1) -> Tensor:
        """Exact L2 norm of each example's gradient over the covered parameters, (B,) (see
        :meth:`CapturedLayers.grad_norms`), a shared weight's as the norm of the sum of its uses."""
        total, shared = None, {}
        for layer, mats in self._calls(captures):
            if not mats:
                continue
            a, delta = regroup(*(torch.cat([m[i] for m in mats], dim=1) for i in (0, 1)), group)
            key = getattr(layer, "key", None)
            if key is not None:  # an embedding or a shared weight: the norm of the sum of its uses
                shared.setdefault(key, []).append((layer, a, delta))
                continue
            sq = term_sq_norm(layer, a, delta)
            total = sq if total is None else total + sq
        for uses in shared.values():
            sq = shared_sq_norm(uses)
            total = sq if total is None else total + sq
        if total is None:
            raise ShapeError("no selected layer ran in the forward pass; check the layer selection")
        return total.clamp_min(0).sqrt()

    def _inputs(self, captures: Captures) -> Iterator[tuple[LayerSpec, Tensor, Tensor]]:
        """Per layer that ran, ``(layer, a, delta)`` with its calls as extra positions; checks
        that every layer saw the same examples."""
        rows: int | None = None
        raw = [self.batched and s.bias and s.layout in ("linear", "conv1d") for s in self.layers]
        rest = [[] if r else calls for r, calls in zip(raw, captures)] if len(captures) == len(self.layers) else captures
        for (layer, mats), r, calls in zip(self._calls(rest), raw, captures):  # r: a without the ones column
            mats = [plain_matrices(layer, inp, grad) for inp, grad in calls] if r else mats
            if not mats:
                continue
            for a, _ in mats:
                if rows is not None and a.shape[0] != rows:
                    raise ShapeError(f"layer {layer.name} was captured for {a.shape[0]} examples, the layers "
                                     f"before it for {rows}; capture all layers from one batch")
                rows = a.shape[0]
            a, delta = mats[0] if len(mats) == 1 else (torch.cat([m[i] for m in mats], dim=1) for i in (0, 1))
            yield layer, a, delta
        if rows is None:
            raise ShapeError("no selected layer ran in the forward pass; check the layer selection")

    def _project_batched(self, inputs: Iterator[tuple[LayerSpec, Tensor, Tensor]], checkpoint: int) -> Tensor:
        """The unscaled sketch (B, k) of the batched path (:class:`SketchBatch`)."""
        acc: SketchBatch | None = None
        for layer, a, delta in inputs:
            if acc is None:
                like = delta if layer.layout == "embedding" else a
                acc = SketchBatch(a.shape[0], self.k, like, self._wrap, partial(self._workspace, like),
                                  partial(self._group_index, checkpoint, like), self._bound, self.workspace_elements)
            if layer.layout in NORM_LAYOUTS:
                for param, g in zip(layer.params, norm_grads(layer, a, delta)):
                    buckets, signs = self._vector(checkpoint, param, layer.d_out, acc.buf)
                    for lo, hi, view in acc.slots(("vector", param), buckets):
                        torch.mul(g[lo: hi], signs, out=view)
            elif layer.layout == "embedding":
                ids_side, cols = self._row_signs(checkpoint, layer, delta), self._side(checkpoint, layer, "in", delta)
                step = max(1, CHUNK_ELEMENTS // max(a.shape[1] * layer.d_in, 1))
                for lo in range(0, a.shape[0], step):
                    acc.scatter(lo, *embedding_entries(a[lo: lo + step], delta[lo: lo + step], *ids_side, cols))
            elif self.path(layer, a.shape[1]) == "form":
                sides = (self._side(checkpoint, layer, "in", a), self._side(checkpoint, layer, "out", a))
                formed_into(acc, layer, a.to(acc.dtype), delta.to(acc.dtype), self._side(checkpoint, layer, "formed_t", a),
                            sides)
            else:
                sides = (self._side(checkpoint, layer, "in", a), self._side(checkpoint, layer, "out", a))
                a = a if a.shape[-1] == layer.d_in else torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
                step = max(1, CHUNK_ELEMENTS // max(a.shape[1] * (self.k + 2), 1))
                for lo in range(0, a.shape[0], step):
                    acc.add_spectrum(lo, spectrum(a[lo: lo + step], delta[lo: lo + step], *sides, self.k))
        assert acc is not None  # _inputs raises when no layer ran
        return acc.result()

    def project(self, captures: Captures, checkpoint: int) -> Tensor:
        """Features from per-layer captures.

        Args:
            captures: per layer (in :attr:`layers` order) the list of its calls' ``(input,
                output gradient)`` (see :func:`tda.gradients.captures.capture_layers`); a layer never
                called has none, several calls of a layer are its positions together.
            checkpoint: checkpoint id selecting the hashes.

        Returns:
            (B, k) features, fp32 (fp64 for fp64 inputs).

        Raises:
            ShapeError: captures that do not match the layers, or no layer ran.
        """
        if checkpoint < 0:
            raise ConfigError(f"checkpoint id must be >= 0, got {checkpoint}")
        if self.batched:
            return self._project_batched(self._inputs(captures), checkpoint).mul_(self.scale)
        acc: dict[str, Tensor] = {}
        for layer, a, delta in self._inputs(captures):
            if layer.layout in MATRIX_LAYOUTS:  # calls as extra positions: (B, N, d)
                self._sketch_layer(layer, a, delta, checkpoint, acc)
            else:
                self._sketch_term(layer, a, delta, checkpoint, acc)
        out = acc["real"] if "real" in acc else None
        if "spectrum" in acc:
            waves = torch.fft.irfft(acc["spectrum"], n=self.k, dim=1)
            out = waves if out is None else out.add_(waves)
        return out.mul_(self.scale)


__all__ = ["TensorSketchProjector", "TensorSketchSpec", "count_sketch", "sketch_fft", "sketch_formed", "spectrum"]
