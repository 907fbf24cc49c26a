"""Small reference models used by the demo configs, tests and benchmarks."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def mlp(in_dim: int = 784, hidden: Sequence[int] = (512, 512), out_dim: int = 10) -> nn.Sequential:
    """A ReLU MLP ``in_dim -> hidden... -> out_dim`` (no BatchNorm/dropout: vmap-safe)."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)
