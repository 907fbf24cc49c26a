"""A projection is one plug-in: a toy projection defined and registered only here is taken by
``tda.Attributor(projection=...)`` and by ``featurize.projection`` in a config (``tda run``, then
``tda query``) with no edit to any other file; its features equal those of the featurizer it
declares, built by hand (the reference), and only its own settings enter the run's fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from pipelines.cli.main import main
from pipelines.config import load_config
from pipelines.run import feature_fingerprint
from stores import FeatureStore
from tda.core.features import concat_blocks
from tda.errors import ConfigError
from tda.featurizers.gradient import Featurizer
from tda.featurizers.spec import SPECS, projection_spec, register_projection, unregister_projection

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
NAME = "oddsparse"


@dataclass(frozen=True)
class OddSparse:
    """The SJLT with two nonzeros per coordinate under the odd seed ``2 seed + 1``."""

    name: ClassVar[str] = NAME
    width_is_k: ClassVar[bool] = True
    k: int = 1024
    seed: int = 0

    def featurizer(self, model: Any, task: Any, **common: Any) -> Featurizer:
        return Featurizer(model, task, k=self.k, seed=2 * self.seed + 1, projection="sparse", nonzeros=2, **common)


@pytest.fixture
def oddsparse():
    register_projection(OddSparse)
    yield OddSparse
    unregister_projection(NAME)
    assert NAME not in SPECS


def test_the_api_takes_a_registered_projection(oddsparse) -> None:
    import tda
    from tda.models.reference import mlp

    torch.manual_seed(0)
    model = mlp(20, (8,), 3)
    x, y = torch.randn(12, 20), torch.randint(0, 3, (12,))
    attr = tda.Attributor(model, [model.state_dict()], k=16, seed=2, projection=NAME, k_in=4, batch_size=5)
    got = attr.featurize((x, y)).feats[0]
    reference = Featurizer(mlp(20, (8,), 3), attr._settings["task"], k=16, seed=5, projection="sparse", nonzeros=2)
    reference.model.load_state_dict(model.state_dict())
    want, _ = reference.featurize_batch({"x": x, "y": y}, list(range(12)), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert projection_spec(NAME, k=16, seed=2, k_in=4, nonzeros=7) == OddSparse(k=16, seed=2)  # own keys only
    with pytest.raises(ConfigError, match="new, non-'auto' name"):
        register_projection(OddSparse)


def _train_features(run: Path) -> np.ndarray:
    return concat_blocks(list(FeatureStore.open(run / "features-train").iter_blocks())).feats


def test_a_config_takes_a_registered_projection(oddsparse, tmp_path, capsys) -> None:
    toy, ref = tmp_path / "toy", tmp_path / "ref"
    assert main(["run", str(TINY), "--out", str(toy), "--set", f"featurize.projection={NAME}", "--set",
                 "featurize.seed=1", "--quiet"]) == 0
    # the reference: the SJLT it declares (seed 2*1+1, two nonzeros), through the built-in projection
    assert main(["run", str(TINY), "--out", str(ref), "--set", "featurize.projection=sparse", "--set",
                 "featurize.seed=3", "--set", "featurize.nonzeros=2", "--quiet"]) == 0
    np.testing.assert_allclose(_train_features(toy), _train_features(ref), rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["query", "--run", str(toy), "--example", "0", "-k", "3"]) == 0
    assert "query id 0" in capsys.readouterr().out
    # a setting the toy does not read (nonzeros) leaves its fingerprint; one it reads (k) changes it
    cfg = load_config(TINY, [f"featurize.projection={NAME}"])
    same = load_config(TINY, [f"featurize.projection={NAME}", "featurize.nonzeros=4"])
    other = load_config(TINY, [f"featurize.projection={NAME}", "featurize.k=32"])
    assert feature_fingerprint(cfg, "train") == feature_fingerprint(same, "train") != feature_fingerprint(other, "train")


def test_an_unregistered_projection_is_refused_in_a_config(tmp_path, capsys) -> None:
    assert main(["run", str(TINY), "--out", str(tmp_path / "r"), "--set", f"featurize.projection={NAME}"]) == 2
    assert "featurize.projection" in capsys.readouterr().err
