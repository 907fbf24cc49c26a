"""Seeded training subsets for counterfactual retraining."""

from __future__ import annotations

import numpy as np

from tda.errors import ConfigError


def sample_subsets(n: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """J masks of exactly ``floor(alpha n)`` examples each; subset j is drawn from seed (seed, j).

    Returns:
        (J, n) bool masks, reproducible from (n, alpha, seed) alone.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    size = int(np.floor(alpha * n))
    if size < 1 or n_subsets < 1:
        raise ConfigError(f"need alpha*n >= 1 and at least one subset, got n={n}, alpha={alpha}, J={n_subsets}")
    masks = np.zeros((n_subsets, n), dtype=bool)
    for j in range(n_subsets):
        rng = np.random.default_rng([seed, j])
        masks[j, rng.choice(n, size=size, replace=False)] = True
    return masks
