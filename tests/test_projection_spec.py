"""One factory for every projection (tda.featurizers.spec): typed specs keep only their own keys,
and the featurizer built from a spec is the one the projection's class gives directly (reference:
the features of that class, constructed by hand)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tda.errors import ConfigError
from tda.featurizers.factored import FactoredFeaturizer
from tda.featurizers.gradient import Featurizer
from tda.featurizers.spec import (DenseProjection, FactoredProjection, SparseProjection, TensorSketchProjection,
                                 make_featurizer, projection_spec)
from tda.models.tasks import ClassificationTask

SETTINGS = {"k": 64, "seed": 3, "kind": "gaussian", "backend": "dense", "nonzeros": 2, "k_in": 4, "k_out": 5,
            "precision": "fp32"}


def test_each_spec_keeps_only_its_own_keys():
    assert projection_spec("dense", **SETTINGS) == DenseProjection(k=64, seed=3, kind="gaussian", backend="dense")
    assert projection_spec("sparse", **SETTINGS) == SparseProjection(k=64, seed=3, nonzeros=2)
    assert projection_spec("tensorsketch", **SETTINGS) == TensorSketchProjection(k=64, seed=3)
    assert projection_spec("factored", **SETTINGS) == FactoredProjection(k_in=4, k_out=5, seed=3, kind="gaussian")
    assert projection_spec("factored", k_in=None).k_in is None  # None is identity, not "unset"
    with pytest.raises(ConfigError, match="projection 'kron' is unknown; use one of"):
        projection_spec("kron", **SETTINGS)
    with pytest.raises(ConfigError, match="not a projection spec"):
        make_featurizer("dense", nn.Linear(2, 2), ClassificationTask())


def _features(featurizer, x, y) -> np.ndarray:
    phi, _ = featurizer.featurize_batch({"x": x, "y": y}, list(range(len(y))), 0)
    return phi


@pytest.mark.parametrize("name, direct", [
    ("dense", lambda m, t: Featurizer(m, t, k=64, seed=3, kind="gaussian", backend="dense", projection="dense")),
    ("sparse", lambda m, t: Featurizer(m, t, k=64, seed=3, projection="sparse", nonzeros=2)),
    ("tensorsketch", lambda m, t: FactoredFeaturizer(m, t, seed=3, projection="tensorsketch", k=64)),
    ("factored", lambda m, t: FactoredFeaturizer(m, t, k_in=4, k_out=5, seed=3, kind="gaussian")),
])
def test_the_factory_builds_what_each_class_builds(name, direct):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    task = ClassificationTask()
    made = make_featurizer(projection_spec(name, **SETTINGS), model, task)
    reference = direct(model, task)
    assert type(made) is type(reference) and made.spec() == reference.spec()
    np.testing.assert_allclose(_features(made, x, y), _features(reference, x, y), rtol=1e-5, atol=1e-6)
