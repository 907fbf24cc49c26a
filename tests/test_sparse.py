"""The sparse JL projection (SJLT): float64 against an explicit matrix rebuilt from the hashes,
the sketch's structure and determinism, inner products unbiased with the dense projector's
variance, and the projection through Featurizer, Attributor and a config run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli.main import main
from pipelines.config import parse_config
from stores import FeatureStore
from tda import Attributor
from tda.errors import ConfigError, ShapeError
from tda.featurizers.gradient import Featurizer
from tda.projections.sparse import SparseProjector
from tda.models.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]


def explicit(p: SparseProjector, checkpoint: int) -> np.ndarray:
    """The (d, k) float64 matrix written entry by entry from the hashes (no torch)."""
    cols, signs = p.hashes(checkpoint)
    m = np.zeros((p.dim, p.k))
    for t in range(p.nonzeros):
        for j in range(p.dim):
            m[j, cols[t, j]] += signs[t, j]
    return m * math.sqrt(p.k / (p.nonzeros * p.dim))


@pytest.mark.parametrize("s", [1, 4])
def test_float64_projection_equals_the_explicit_matrix(s: int) -> None:
    p = SparseProjector(dim=300, k=32, seed=5, nonzeros=s, block_rows=128)  # three hash blocks
    g = torch.randn(6, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = g.numpy() @ explicit(p, 2)
    out = p.project(g, checkpoint=2)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p.project(g.float(), 2).numpy(), ref, rtol=1e-4, atol=1e-5)  # fp32 path
    assert torch.equal(g, torch.randn(6, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))


def test_sketch_structure_and_determinism() -> None:
    p = SparseProjector(dim=1000, k=64, seed=1, nonzeros=4, block_rows=300)
    m = explicit(p, 0)
    scale = math.sqrt(64 / (4 * 1000))
    assert ((m != 0).sum(axis=1) == 4).all()  # s entries per coordinate, one in each segment: no collisions
    for t in range(4):
        assert ((m[:, 16 * t: 16 * (t + 1)] != 0).sum(axis=1) == 1).all()
    np.testing.assert_allclose(np.abs(m[m != 0]), scale)
    again = SparseProjector(dim=1000, k=64, seed=1, nonzeros=4, block_rows=300)
    assert all(np.array_equal(a, b) for a, b in zip(p.hashes(3), again.hashes(3)))  # a pure function
    assert not np.array_equal(p.hashes(0)[0], p.hashes(1)[0])  # checkpoints differ
    assert not np.array_equal(p.hashes(0)[0], SparseProjector(1000, 64, seed=2, nonzeros=4, block_rows=300).hashes(0)[0])
    assert p.spec_dict() == {"dim": 1000, "k": 64, "seed": 1, "kind": "sjlt", "nonzeros": 4, "block_rows": 300,
                             "backend": "sparse", "precision": "fp32"}


@pytest.mark.parametrize("s", [1, 2])
def test_inner_products_are_unbiased_with_the_expected_variance(s: int) -> None:
    """Over independent sketches, phi_a . phi_b has mean (k/d) a.b and variance
    (k/d^2)(|a|^2|b|^2 + (a.b)^2 - 2 sum a_i^2 b_i^2), as the dense Rademacher projection."""
    d, k, draws = 400, 32, 1500
    rng = np.random.default_rng(0)
    a = rng.standard_normal(d) * np.linspace(0.2, 3.0, d)  # uneven coordinates
    b = 0.6 * a + rng.standard_normal(d)
    g = torch.from_numpy(np.stack([a, b]))
    est = np.array([float(torch.dot(*SparseProjector(d, k, seed=i, nonzeros=s).project(g, 0))) for i in range(draws)])
    mean = k / d * a @ b
    var = k / d**2 * ((a @ a) * (b @ b) + (a @ b) ** 2 - 2 * np.sum(a**2 * b**2))
    assert abs(est.mean() - mean) < 4 * math.sqrt(var / draws)
    assert 0.85 < est.var(ddof=1) / var < 1.15  # sd of the ratio ~ 0.04 at 1,500 draws


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="multiple of nonzeros"):
        SparseProjector(100, 30, nonzeros=4)
    with pytest.raises(ShapeError, match=r"shape \(B, 100\)"):
        SparseProjector(100, 32).project(torch.zeros(2, 99), 0)
    with pytest.raises(ConfigError, match="fp32 only"):
        Featurizer(torch.nn.Linear(3, 2), ClassificationTask(), k=8, projection="sparse", precision="bf16")
    with pytest.raises(ConfigError, match="'sjlt' is unknown"):
        Featurizer(torch.nn.Linear(3, 2), ClassificationTask(), k=8, projection="sjlt")
    with pytest.raises(ConfigError, match=r"featurize.k \(100\) must be a multiple of featurize.nonzeros \(8\)"):
        parse_config({"featurize": {"projection": "sparse", "k": 100, "nonzeros": 8}})


def test_featurizer_and_attributor_project_sparsely(make_mlp, tiny_data) -> None:
    model = make_mlp(seed=0)
    x, y = tiny_data(12)
    fz = Featurizer(model, ClassificationTask(), k=16, seed=3, projection="sparse", nonzeros=2)
    phi, _ = fz.featurize_batch({"x": x, "y": y}, np.arange(12), checkpoint=1)
    flat = fz.gradients({"x": x, "y": y}).double().numpy()
    np.testing.assert_allclose(phi, flat @ explicit(fz.projector, 1), rtol=1e-4, atol=1e-6)
    assert fz.spec()["kind"] == "sjlt" and fz.spec()["nonzeros"] == 2

    import datasets

    rows = datasets.Dataset.from_dict({"x": x.numpy(), "y": y.numpy()})
    collate = lambda b: {"x": torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in b["x"]])),  # noqa: E731
                         "y": torch.as_tensor(np.asarray(b["y"]))}
    attr = Attributor(model, [model.state_dict()], collate, k=16, seed=3, projection="sparse", nonzeros=2).fit(rows)
    assert isinstance(attr.featurizer.projector, SparseProjector)
    scores = attr.scores(rows)
    assert scores.shape == (12, 12) and np.isfinite(scores).all()
    assert np.mean(np.diag(scores) > 0) > 0.8  # self-influence is positive


def test_a_config_run_with_the_sparse_projection(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--quiet",
                 "--set", "featurize.projection=sparse", "--set", "featurize.nonzeros=2"]) == 0
    assert "query id" in capsys.readouterr().out
    spec = FeatureStore.open(out / "features-train").manifest["spec"]
    assert spec["kind"] == "sjlt" and spec["nonzeros"] == 2 and spec["backend"] == "sparse"
    scores = np.load(out / "scores" / "scores.npy")
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    p = SparseProjector(dim=5000, k=256, seed=0, nonzeros=2)
    g = torch.randn(8, 5000)
    np.testing.assert_allclose(p.project(g.cuda(), 0).cpu().numpy(), p.project(g, 0).numpy(), rtol=1e-4, atol=1e-5)
