"""The seeded blocked projector (docs/methods.md section 2): determinism, exactness, statistics."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tda.errors import ConfigError, MissingDependencyError, ShapeError
from tda.projections.projectors import Projector, default_block_rows

REPO = Path(__file__).parents[1]
DIM, K, BLOCK_ROWS = 1000, 64, 300  # 4 blocks, the last one holding 100 rows


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _projector(**kw) -> Projector:
    args = dict(dim=DIM, k=K, seed=3, block_rows=BLOCK_ROWS)
    args.update(kw)
    return Projector(**args)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blocks_are_pure_functions_of_seed_checkpoint_block(kind: str) -> None:
    p = _projector(kind=kind)
    assert p.n_blocks == 4
    b = p.block(1, 2)
    assert b.shape == (BLOCK_ROWS, K) and b.dtype == torch.float32
    assert p.block(3, 3).shape == (DIM - 3 * BLOCK_ROWS, K)
    assert torch.equal(b, p.block(1, 2))
    assert torch.equal(b, _projector(kind=kind).block(1, 2))  # a second instance
    assert not torch.equal(b, p.block(0, 2))  # another checkpoint
    assert not torch.equal(b, p.block(1, 1))  # another block
    assert not torch.equal(b, _projector(kind=kind, seed=4).block(1, 2))  # another seed
    # the same holds for whole matrices and for projections
    assert torch.equal(p.matrix(1), p.matrix(1))
    g = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.project(g, 1), _projector(kind=kind).project(g, 1))
    assert not torch.allclose(p.project(g, 0), p.project(g, 1))


def test_same_blocks_in_a_fresh_process() -> None:
    code = (
        "import hashlib; from tda.projections.projectors import Projector\n"
        "for kind in ('rademacher', 'gaussian'):\n"
        f"    b = Projector({DIM}, {K}, seed=3, kind=kind, block_rows={BLOCK_ROWS}).block(1, 2)\n"
        "    print(hashlib.sha256(b.contiguous().numpy().tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    hashes = out.stdout.split()
    assert hashes == [_digest(_projector(kind="rademacher").block(1, 2)),
                      _digest(_projector(kind="gaussian").block(1, 2))]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blocked_projection_equals_dense_product(kind: str) -> None:
    p = _projector(kind=kind)
    mat = p.matrix(2)
    assert mat.shape == (DIM, K)
    assert torch.equal(mat[BLOCK_ROWS: 2 * BLOCK_ROWS], p.block(2, 1))
    g = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = g @ mat.double() / math.sqrt(DIM)
    got64 = p.project(g, 2)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, ref, rtol=1e-12, atol=1e-12)
    got32 = p.project(g.float(), 2)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)


def test_rademacher_entries_are_signs_and_balanced() -> None:
    mat = _projector(kind="rademacher").matrix(0)  # 64,000 entries
    assert torch.all(mat.abs() == 1.0)
    assert abs(mat.mean().item()) < 0.02  # 5 standard errors
    col_means = mat.mean(dim=0)
    assert col_means.abs().max().item() < 0.16  # every column balanced (5 sigma at d = 1000)
    # columns (and hence bit positions within a byte) are uncorrelated: P^T P / d ~ I
    gram = (mat.T @ mat / DIM).numpy()
    np.testing.assert_allclose(np.diag(gram), 1.0)
    assert np.abs(gram - np.eye(K)).max() < 0.2


def test_gaussian_entries_are_standard_normal() -> None:
    vals = _projector(kind="gaussian").matrix(0).double().numpy().ravel()
    assert abs(vals.mean()) < 0.02
    assert abs(vals.std() - 1.0) < 0.02
    kurtosis = np.mean((vals - vals.mean()) ** 4) / vals.var() ** 2
    assert abs(kurtosis - 3.0) < 0.15
    assert abs(np.mean(np.abs(vals)) - math.sqrt(2 / math.pi)) < 0.02


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_roughly_preserved(kind: str) -> None:
    d, k = 3000, 2048
    p = Projector(d, k, seed=11, kind=kind)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, d, generator=gen)
    g = 0.7 * base + torch.randn(6, d, generator=gen)  # correlated gradients
    phi = p.project(g, 0).double()
    g = g.double()
    # phi = P^T g / sqrt(d), so E<phi_i, phi_j> = (k / d) <g_i, g_j>
    ratio = (phi.norm(dim=1) ** 2) * d / k / (g.norm(dim=1) ** 2)
    assert torch.all((ratio - 1).abs() < 0.15), ratio
    cos_g = torch.nn.functional.normalize(g, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    cos_p = torch.nn.functional.normalize(phi, dim=1) @ torch.nn.functional.normalize(phi, dim=1).T
    assert (cos_g - cos_p).abs().max().item() < 0.1
    assert cos_g[~torch.eye(6, dtype=torch.bool)].min().item() > 0.2  # the check is not vacuous


def test_fp64_accumulates_in_fp64() -> None:
    p = _projector()
    # a large common offset: fp32 accumulation would lose about 1e-7 relative precision
    g = 1e6 + torch.randn(2, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = g @ p.matrix(0).double() / math.sqrt(DIM)
    got = p.project(g, 0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-6)


def test_fp16_input_accumulates_in_fp32_without_overflow() -> None:
    p = _projector()
    g = torch.full((2, DIM), 60000.0, dtype=torch.float16)  # sums far above fp16's 65504
    got = p.project(g, 0)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    ref = g.double() @ p.matrix(0).double() / math.sqrt(DIM)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)


def test_wrong_gradient_width_raises_shape_error() -> None:
    p = _projector()
    with pytest.raises(ShapeError, match=r"expects gradients of shape \(B, 1000\), got \(2, 999\)"):
        p.project(torch.zeros(2, DIM - 1), 0)
    with pytest.raises(ShapeError, match=r"got \(1000,\)"):
        p.project(torch.zeros(DIM), 0)


def test_zero_cache_budget_gives_identical_results() -> None:
    g = torch.randn(4, DIM, generator=torch.Generator().manual_seed(3))
    cached = _projector()
    uncached = _projector(cache_bytes=0)
    first = cached.project(g, 1)
    assert torch.equal(first, uncached.project(g, 1))
    assert torch.equal(cached.project(g, 1), first)  # second call served from the cache
    assert torch.equal(uncached.project(g, 1), first)
    cached.clear_cache()
    assert torch.equal(cached.project(g, 1), first)


def test_the_cache_keeps_signs_as_int8_and_widens_them_exactly() -> None:
    p = _projector()
    g = torch.randn(3, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = g @ p.matrix(2).double() / DIM**0.5
    torch.testing.assert_close(p.project(g, 2), ref, rtol=1e-12, atol=1e-12)  # fp64, via the int8 cache
    assert {t.dtype for t in p._cache.values()} == {torch.int8}
    assert p._cached_bytes == p.matrix_bytes() == DIM * p.k
    assert torch.equal(p.block(2, 0, torch.int8).float(), p.block(2, 0))
    with pytest.raises(ConfigError, match="only Rademacher blocks"):
        _projector(kind="gaussian").block(0, 0, torch.int8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sparse"}, "kind 'sparse' is unknown"),
        ({"backend": "gpu"}, "backend 'gpu' is unknown"),
        ({"dim": 0}, "dim > 0 and k > 0"),
        ({"k": 0}, "dim > 0 and k > 0"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_configuration_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _projector(**kwargs)


def test_bad_block_or_checkpoint_raises() -> None:
    p = _projector()
    with pytest.raises(ConfigError, match=r"block 4 out of range \[0, 4\)"):
        p.block(0, 4)
    with pytest.raises(ConfigError, match="checkpoint id must be >= 0"):
        p.block(-1, 0)


def test_spec_records_what_determines_the_matrix() -> None:
    p = _projector()
    assert p.spec_dict() == {"dim": DIM, "k": K, "seed": 3, "kind": "rademacher",
                             "block_rows": BLOCK_ROWS, "backend": "dense", "precision": "fp32"}
    assert Projector(DIM, K).block_rows == default_block_rows(K)


@pytest.mark.skipif(importlib.util.find_spec("fast_jl") is not None, reason="fast_jl is installed")
def test_fast_jl_without_the_kernel_raises_missing_dependency() -> None:
    with pytest.raises(MissingDependencyError, match="pip install traker"):
        Projector(DIM, 512, backend="fast_jl")


def test_bf16_uses_the_same_matrix_and_stays_close() -> None:
    """bf16 precision: the same +-1 entries, features within bf16 rounding of fp32."""
    fp32, bf16 = _projector(), _projector(precision="bf16")
    for b in range(fp32.n_blocks):
        assert torch.equal(bf16.block(1, b, torch.bfloat16).float(), fp32.block(1, b))
    g = torch.randn(6, DIM, generator=torch.Generator().manual_seed(0))
    a, b = fp32.project(g, 1), bf16.project(g, 1)
    assert b.dtype == torch.float32
    assert float((a - b).norm() / a.norm()) < 1e-2
    assert bf16.spec_dict()["precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision 'fp8' is unknown"):
        _projector(precision="fp8")


def test_panels_group_blocks_without_changing_the_product(monkeypatch) -> None:
    """Grouping generation blocks into GEMM panels leaves the result unchanged."""
    import tda.projections.projectors as projectors

    g = torch.randn(5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    one = _projector()
    monkeypatch.setattr(projectors, "_PANEL_ENTRIES", 2 * BLOCK_ROWS * K)
    grouped = _projector()
    assert grouped.blocks_per_panel == 2 and grouped.n_panels == 2 and one.n_panels == 1
    expected = g @ one.matrix(2).double() / DIM ** 0.5
    torch.testing.assert_close(grouped.project(g, 2), expected, rtol=1e-12, atol=1e-12)
