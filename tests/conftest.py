"""Shared fixtures: tiny seeded models, tiny synthetic classification data, the MNIST folder.

Every fixture is seeded and small enough that the whole suite runs in seconds on two CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from tda.models.reference import mlp

# Tiny matmuls are much slower with several intra-op threads on a small, shared CPU.
torch.set_num_threads(1)

MNIST_ROOT = Path(__file__).parents[1].parent / "shared" / "data" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _mnist_present(root: Path) -> bool:
    return root.is_dir() and all(
        (root / f).is_file() or (root / (f + ".gz")).is_file() for f in MNIST_FILES
    )


@pytest.fixture
def mnist_root() -> Path:
    """The shared MNIST idx folder; tests using it are skipped when it is absent."""
    if not _mnist_present(MNIST_ROOT):
        pytest.skip(f"MNIST idx files not found in {MNIST_ROOT} (shared data folder missing)")
    return MNIST_ROOT


@pytest.fixture
def make_mlp() -> Callable[..., nn.Module]:
    """Factory for a seeded ReLU MLP ``in_dim -> hidden -> out_dim`` (vmap-safe)."""

    def build(seed: int = 0, in_dim: int = 5, hidden: tuple[int, ...] = (7,), out_dim: int = 3) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(in_dim, hidden, out_dim).eval()

    return build


def synthetic_classification(n: int, in_dim: int = 5, classes: int = 3, seed: int = 0,
                             noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, in_dim) float32 and labels (n,) int64 from a noisy random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(in_dim, classes, generator=gen)
    x = torch.randn(n, in_dim, generator=gen)
    y = (x @ teacher + noise * torch.randn(n, classes, generator=gen)).argmax(dim=1)
    return x, y


@pytest.fixture
def tiny_data() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory for seeded synthetic classification data (see :func:`synthetic_classification`)."""
    return synthetic_classification


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching rows of two (m, n) matrices."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(a[i], b[i]).statistic for i in range(a.shape[0])])


@pytest.fixture
def spearman_rows() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return rowwise_spearman


@pytest.fixture(scope="session")
def default_tiny_run(tmp_path_factory) -> Path:
    """``tda run configs/tiny.yaml`` with its defaults, made once per session; tests only read it
    (copy it with shutil.copytree to change anything)."""
    from pipelines.cli.main import main

    out = tmp_path_factory.mktemp("default-tiny") / "tiny"
    assert main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), "--out", str(out),
                 "--quiet"]) == 0
    return out
