"""Scorers: each defines two transforms whose inner product is the attribution score."""

from .base import Scorer
from .trak import DEFAULT_LAMBDA_REL, TRAKScorer

__all__ = ["Scorer", "TRAKScorer", "DEFAULT_LAMBDA_REL", "make_scorer"]


def make_scorer(name: str, **kwargs: object) -> Scorer:
    """Build a scorer by name (``"trak"``)."""
    from ..errors import ConfigError

    registry = {"trak": TRAKScorer}
    if name not in registry:
        raise ConfigError(f"unknown scorer {name!r}; choose one of {sorted(registry)}")
    return registry[name](**kwargs)
