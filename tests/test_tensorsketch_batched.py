"""The batched tensorsketch path (tda.projections.sketch_batch: signed formed gradients of several
layers scattered together, embeddings without ``mod k``) gives the features of the per-layer path
(``batched=False``), up to rounding: every kind of layer (linear over positions, a layer called
twice, convolutions, embeddings with a padding row, a tied LM head, norms), both ways of signing
a formed gradient, the FFT path alongside, fp32 and fp64, and a workspace small enough that layers
are split into chunks of examples and groups are flushed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tda.featurizers.factored import capture_layers
from tda.models.tasks import ClassificationTask
from tda.projections.sketch_layers import tensorsketch_selection
from tda.projections.tensorsketch import TensorSketchProjector
from test_tensorsketch import COVERAGE, _Sequence, _cnn, _mlp


class _Padded(nn.Module):
    """ids (B, T) -> embeddings (padding row 0) -> LayerNorm -> linear over tokens -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.emb, self.norm = nn.Embedding(11, 6, padding_idx=0), nn.LayerNorm(6)
        self.mix, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.norm(self.emb(x)))).mean(dim=1))


def _padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 11, (5, 7), generator=torch.Generator().manual_seed(8))
    ids[:, 5:] = 0  # padding, and a padding id inside a row
    ids[1, 2] = 0
    return {"x": ids, "y": torch.tensor([0, 2, 1, 1, 0])}


def _float_batch(width: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"x": torch.randn(5, width, generator=gen, dtype=dtype), "y": torch.tensor([0, 2, 1, 1, 0])}


CASES = {
    "mlp": (lambda dt: _mlp().to(dt), ClassificationTask(), lambda dt: _float_batch(5, dt)),
    "cnn": (lambda dt: _cnn().to(dt), ClassificationTask(), lambda dt: _float_batch(72, dt)),
    "sequence": (lambda dt: _Sequence().to(dt).eval(), ClassificationTask(), lambda dt: _float_batch(12, dt)),
    "padded-embedding": (lambda dt: _Padded().to(dt).eval(), ClassificationTask(), lambda dt: _padded_batch()),
    **{name: (lambda dt, b=build: b().to(dt), task, lambda dt, m=make: {
        key: v.to(dt) if v.is_floating_point() else v for key, v in m().items()})
       for name, (build, task, make) in COVERAGE.items()},
}


@pytest.mark.parametrize("workspace", [None, 40, 400])
@pytest.mark.parametrize("method", ["auto", "form", "fft"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_path_equals_the_per_layer_path(case: str, dtype: torch.dtype, method: str,
                                                 workspace: int | None) -> None:
    build, task, make = CASES[case]
    model, batch = build(dtype), make(dtype)
    layers = tensorsketch_selection(model)
    caps = capture_layers(model, task, batch, layers)
    per_layer = TensorSketchProjector(layers, k=13, seed=4, method=method, batched=False)
    batched = TensorSketchProjector(layers, k=13, seed=4, method=method)
    if workspace is not None:  # a few examples of one layer at a time, groups flushed often
        batched.workspace_elements = workspace
    want = per_layer.project(caps, checkpoint=1)
    for _ in range(2):  # the second time from the cached indices and the reused workspace
        got = batched.project(caps, checkpoint=1)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got, want, **tol)
    assert not torch.equal(want, torch.zeros_like(want))


def test_the_padding_row_gets_no_sketch() -> None:
    """An example made of padding only has a zero embedding term: its features come from the
    other layers alone, the same as with the padding row left out of the captures."""
    model, batch = _Padded().double().eval(), _padded_batch()
    batch["x"][0] = 0
    layers = tensorsketch_selection(model)
    caps = capture_layers(model, ClassificationTask(), batch, layers)
    proj = TensorSketchProjector(layers, k=16, seed=1)
    full = proj.project(caps, checkpoint=0)
    emb = [i for i, s in enumerate(layers) if s.layout == "embedding"][0]
    caps[emb] = [(ids, grad * (ids != 0).unsqueeze(-1)) for ids, grad in caps[emb]]
    torch.testing.assert_close(full, proj.project(caps, checkpoint=0), rtol=1e-12, atol=1e-14)
