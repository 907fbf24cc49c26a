"""The sums of the TensorSketch projection (:mod:`tda.projections.tensorsketch`): the two ways of
sketching one layer (FFTs of the two CountSketches, or the formed gradient scattered by the
combined hash) and one batch accumulated with few, large operations (the batched path of
:meth:`TensorSketchProjector.project`).

The per-layer path scatters each layer's entries on their own (one ``x * signs`` and one
``scatter_add_`` per layer and chunk). For a transformer's many small layers those calls, not
the arithmetic, are the cost, so here:

- the CountSketch sign of a formed gradient is folded into the GEMM's operands,
  ``s(i, j) G_ij = sum_t (s_out(i) delta_ti)(s_in(j) a_tj)`` (exact: flipping the signs of the
  inputs flips the sign of every product), where that is fewer products than signing ``G``
  (``N (d_in + d_out) <= d_in d_out``), else multiplied into ``G`` by the one pass that also
  copies it into the workspace; either way ``G`` is scattered as is;
- the signed gradients of several layers (and the signed gradients of norms' vectors) are
  written side by side into one reused workspace ``(B, cap)`` and scattered by ONE
  ``scatter_add_`` with their buckets concatenated (cached per group of layers); a layer too big
  for the workspace is scattered on its own, a chunk of examples at a time;
- an embedding's buckets ``h_row(id) + h_col(j)`` lie in ``[0, 2k)`` and are scattered without
  the ``mod k``: the buffer is ``2k`` wide and its halves are added at the end (its padding row
  has sign 0).

The sums are those of the per-layer path in another order: the same sketch up to rounding.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterator

import torch
from torch import Tensor

from tda.errors import ShapeError
from tda.gradients.captures import LayerSpec

#: Elements of the shared workspace of formed gradients (a batch's small layers go into it
#: together; a bigger layer is done a chunk of examples at a time within it).
WORKSPACE_ELEMENTS = 1 << 22
#: A layer shares the workspace (and the scatter) when its formed gradients are at most
#: ``1 / SHARED`` of it; a bigger one is written by the GEMM straight into the workspace (no copy)
#: and scattered on its own.
SHARED = 8


def count_sketch(x: Tensor, buckets: Tensor, signs: Tensor, k: int) -> Tensor:
    """CountSketch of each row: ``out[r, buckets[j]] += signs[j] x[r, j]``; x (R, d) -> (R, k)."""
    return x.new_zeros(x.shape[0], k).scatter_add_(1, buckets.expand(x.shape[0], -1), x * signs)


def spectrum(a: Tensor, delta: Tensor, side_in: tuple[Tensor, Tensor], side_out: tuple[Tensor, Tensor],
             k: int) -> Tensor:
    """``sum_t rfft(CS_in(a_t)) * rfft(CS_out(delta_t))``: a (B, N, d_in), delta (B, N, d_out) ->
    (B, k // 2 + 1) complex, the spectrum of the unscaled sketch."""
    b, n = a.shape[:2]
    fa = torch.fft.rfft(count_sketch(a.reshape(b * n, -1), *side_in, k), dim=1)  # (B N, k/2 + 1)
    fd = torch.fft.rfft(count_sketch(delta.reshape(b * n, -1), *side_out, k), dim=1)
    return fa.mul_(fd).reshape(b, n, -1).sum(dim=1) if n > 1 else fa.mul_(fd)  # (B, k/2 + 1)


def sketch_fft(a: Tensor, delta: Tensor, side_in: tuple[Tensor, Tensor], side_out: tuple[Tensor, Tensor],
               k: int) -> Tensor:
    """``irfft(sum_t rfft(CS_in(a_t)) * rfft(CS_out(delta_t)))``: (B, k), unscaled."""
    return torch.fft.irfft(spectrum(a, delta, side_in, side_out, k), n=k, dim=1)


def sketch_formed(a: Tensor, delta: Tensor, cols: Tensor, signs: Tensor, k: int) -> Tensor:
    """``G = sum_t delta_t a_t^T`` formed, then scattered by the combined hash: (B, k), unscaled.
    ``cols`` / ``signs``: (d_out d_in,) row-major over ``(i, j)``."""
    g = (delta.transpose(1, 2) @ a).reshape(a.shape[0], -1)  # (B, d_out d_in)
    return count_sketch(g, cols, signs, k)


class SketchBatch:
    """The unscaled sketch of one batch of ``rows`` examples, accumulated layer by layer.

    Args:
        rows: examples. k: sketch width. like: a tensor of the dtype and device to sum in.
        wrap: whether buckets reach ``2k`` (embeddings): the buffer is then ``2k`` wide.
        workspace: ``n -> a flat tensor of at least n elements`` (reused between batches).
        group_index: ``(keys, parts) -> the concatenated buckets`` of a group (cached).
        bound: most columns the workspace can be asked for (the layers' total formed size).
    """

    def __init__(self, rows: int, k: int, like: Tensor, wrap: bool, workspace: Callable[[int], Tensor],
                 group_index: Callable[[tuple, list[Tensor]], Tensor], bound: int,
                 budget: int = WORKSPACE_ELEMENTS) -> None:
        self.rows, self.k, self.budget = rows, k, budget
        self.buf = like.new_zeros(rows, 2 * k if wrap else k)
        self.spectrum: Tensor | None = None
        self.cap = min(budget // rows, bound)
        self._workspace, self._group_index = workspace, group_index
        self._grid = workspace(rows * self.cap).narrow(0, 0, rows * self.cap).view(rows, self.cap) if self.cap else None
        self._keys: list[Hashable] = []
        self._parts: list[Tensor] = []
        self._used = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.buf.dtype

    def slots(self, key: Hashable, buckets: Tensor) -> Iterator[tuple[int, int, Tensor]]:
        """Places to write a signed gradient of ``len(buckets)`` entries per example: yields
        ``(lo, hi, view)`` with ``view`` (hi - lo, d) for examples ``lo:hi``; write it before the
        next step. Small ones share the workspace (a strided view, scattered together later), a
        big one gets it whole (contiguous), chunk by chunk, each scattered at once."""
        d = buckets.shape[0]
        if d <= self.cap and d * self.rows <= self.budget // SHARED:
            if self._used + d > self.cap:
                self.flush()
            yield 0, self.rows, self._grid[:, self._used: self._used + d]
            self._keys.append(key)
            self._parts.append(buckets)
            self._used += d
            return
        self.flush()
        chunks = -(-self.rows * d // self.budget)
        step = -(-self.rows // chunks)
        work = self._workspace(step * d)
        for lo in range(0, self.rows, step):
            hi = min(lo + step, self.rows)
            view = work.narrow(0, 0, (hi - lo) * d).view(hi - lo, d)
            yield lo, hi, view
            self.buf[lo: hi].scatter_add_(1, buckets.expand(hi - lo, -1), view)

    def flush(self) -> None:
        """Scatter the gradients waiting in the workspace, all in one call."""
        if not self._used:
            return
        index = self._parts[0] if len(self._parts) == 1 else self._group_index(tuple(self._keys), self._parts)
        self.buf.scatter_add_(1, index.expand(self.rows, -1), self._grid[:, : self._used])
        self._keys, self._parts, self._used = [], [], 0

    def scatter(self, lo: int, index: Tensor, values: Tensor) -> None:
        """Add ``values`` (r, m) at ``index`` (r, m), buckets in ``[0, 2k)``, to examples ``lo:lo + r``."""
        self.buf[lo: lo + values.shape[0]].scatter_add_(1, index, values.to(self.dtype))

    def add_spectrum(self, lo: int, part: Tensor) -> None:
        """Add an FFT layer's spectrum (r, k // 2 + 1) of examples ``lo:lo + r``."""
        if self.spectrum is None:
            self.spectrum = torch.zeros(self.rows, self.k // 2 + 1, dtype=part.dtype, device=part.device)
        self.spectrum[lo: lo + part.shape[0]] += part

    def result(self) -> Tensor:
        """The unscaled sketch (B, k)."""
        self.flush()
        out = self.buf[:, : self.k] + self.buf[:, self.k:] if self.buf.shape[1] > self.k else self.buf
        if self.spectrum is not None:
            out = out + torch.fft.irfft(self.spectrum, n=self.k, dim=1)
        return out


def plain_matrices(layer: LayerSpec, inp: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """A linear layer's ``a`` (B, N, d_in - 1), WITHOUT the ones column of its bias, and ``delta``
    (B, N, d_out), fp32 (fp64 for fp64 inputs): :func:`tda.gradients.captures.layer_matrices` less
    the copy of ``a`` that the column costs (:func:`formed_into` adds the bias row itself)."""
    dtype = torch.float64 if inp.dtype == torch.float64 else torch.float32
    b = inp.shape[0]
    a, delta = inp.to(dtype).reshape(b, -1, inp.shape[-1]), grad.to(dtype).reshape(b, -1, grad.shape[-1])
    if (a.shape[-1] + 1, delta.shape[-1]) != (layer.d_in, layer.d_out):
        raise ShapeError(f"layer {layer.name}: captured widths {a.shape[-1] + 1}, {delta.shape[-1]} but the projector "
                         f"expects {layer.d_in}, {layer.d_out}")
    if a.shape[1] != delta.shape[1]:
        raise ShapeError(f"layer {layer.name}: {a.shape[1]} input positions but {delta.shape[1]} output positions")
    return a, delta


def formed_into(acc: SketchBatch, layer: LayerSpec, a: Tensor, delta: Tensor, formed_t: tuple[Tensor, Tensor],
                sides: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
    """Write a layer's signed formed gradient into ``acc``'s slots, transposed: ``G^T = sum_t a_t
    delta_t^T`` (d_in, d_out), whose rows (``d_out`` wide) the GEMM writes faster; ``formed_t``: the
    combined ``(buckets, signs)`` over ``G^T`` (d_in d_out,), ``sides``: the in and out ones. ``a``
    without its ones column (:func:`plain_matrices`) gets the bias row ``sum_t delta_t`` added.
    The signs are folded into the operands where that is fewer products (``N (d_in + d_out) <=
    d_in d_out``), else multiplied into ``G^T`` on its way into the workspace."""
    cols, signs = formed_t
    fold = a.shape[1] * (layer.d_in + layer.d_out) <= layer.d_in * layer.d_out
    s_in, s_out = sides[0][1], sides[1][1]
    width = a.shape[-1]
    w = width * layer.d_out  # G^T's entries without the bias row (its last d_out, if any)
    for lo, hi, view in acc.slots(("formed", layer.name), cols[:w]):
        x, y = (a[lo: hi] * s_in[:width], delta[lo: hi] * s_out) if fold else (a[lo: hi], delta[lo: hi])
        if view.is_contiguous():  # a chunk of a big layer: straight into the workspace
            torch.bmm(x.transpose(1, 2), y, out=view.view(hi - lo, width, layer.d_out))
            if not fold:
                view.mul_(signs[:w])
            continue
        g = torch.bmm(x.transpose(1, 2), y).view(hi - lo, -1)  # bmm into a strided view is slow
        view.copy_(g) if fold else torch.mul(g, signs[:w], out=view)
    if width < layer.d_in:  # the bias row sum_t delta_t, with signs s_in(last) s_out
        for lo, hi, view in acc.slots(("bias", layer.name), cols[w:]):
            torch.mul(delta[lo: hi].sum(dim=1), signs[w:], out=view)


def embedding_entries(ids: Tensor, delta: Tensor, row_buckets: Tensor, row_signs: Tensor, cols: tuple[Tensor, Tensor]
                      ) -> tuple[Tensor, Tensor]:
    """Buckets in ``[0, 2k)`` (no ``mod k``) and signed values of an embedding's entries
    ``(id_t, j)``: ids (B, N), delta (B, N, D) -> both (B, N D); ``row_signs`` is 0 on a padding row.
    Ids shared by the batch (position ids, expanded: stride 0) give one row of buckets, expanded."""
    b = ids.shape[0]
    if b > 1 and ids.stride(0) == 0:
        index = (row_buckets[ids[0]].unsqueeze(-1) + cols[0]).reshape(1, -1).expand(b, -1)
        return index, (delta * (row_signs[ids[0]].unsqueeze(-1) * cols[1])).reshape(b, -1)
    index = (row_buckets[ids].unsqueeze(-1) + cols[0]).reshape(b, -1)
    values = (delta * cols[1]).mul_(row_signs[ids].unsqueeze(-1)).reshape(b, -1)
    return index, values


__all__ = ["WORKSPACE_ELEMENTS", "SketchBatch", "count_sketch", "embedding_entries", "formed_into", "plain_matrices",
           "sketch_fft", "sketch_formed", "spectrum"]
