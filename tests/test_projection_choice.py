"""``projection="auto"`` (the default of the API and of configs) for any model: tensorsketch where it
covers every trainable parameter and its captures reproduce autograd on a real batch, else sparse
with the reason logged; runs keep the projection their stored features were made with."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import tda
from tda.data.loading import arrow_columns
from pipelines.families.base import projection_of_spec
from tda.featurizers.choice import choose_projection, structural_choice


class Scaled(nn.Module):
    """A custom parameter outside any layer tensorsketch sketches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.gain


class Reused(nn.Module):
    """Covered layers only, but one weight is used outside its module's forward: the captures miss
    that use, which only the check on a batch can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + F.linear(h, self.fc.weight))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 12):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    import datasets

    return datasets.Dataset.from_dict({"id": list(range(n)), "x": x.tolist(), "y": y.tolist()})


def _collate(cols):
    """An explicit collate: rows of 6 floats and an integer label, as stored."""
    return {"x": torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in cols["x"]])),
            "y": torch.tensor(np.asarray(cols["y"], dtype=np.int64))}


def test_structural_choice_follows_coverage() -> None:
    assert structural_choice(_mlp()).projection == "tensorsketch"
    uncovered = structural_choice(Scaled())
    assert uncovered.projection == "sparse" and "gain" in uncovered.reason
    named = structural_choice(_mlp(), ["0.weight"])  # parameter names: the sparse projection's selection
    assert named.projection == "sparse" and "featurize.params" in named.reason


def test_batch_check_catches_a_weight_used_outside_its_module(caplog) -> None:
    batch = _collate(arrow_columns(_data().with_format("arrow")[:]))
    torch.manual_seed(0)
    model = Reused()
    assert structural_choice(model).projection == "tensorsketch"  # every parameter is in a covered layer
    with caplog.at_level(logging.WARNING, logger="tda.featurizers.choice"):
        choice = choose_projection(model, tda.ClassificationTask(), batch)
    assert choice.projection == "sparse" and "gradient" in choice.reason
    assert any("sparse" in r.getMessage() for r in caplog.records)
    assert choose_projection(_mlp(), tda.ClassificationTask(), batch).projection == "tensorsketch"


def _features(model: nn.Module, projection: str) -> tuple[tda.Attributor, np.ndarray]:
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attr = tda.Attributor(model, [state], collate=_collate, k=32, batch_size=5, projection=projection)
    return attr, attr.featurize(_data()).feats


def test_api_auto_is_tensorsketch_where_it_covers_and_sparse_otherwise(caplog) -> None:
    torch.manual_seed(0)
    mlp, scaled, reused = _mlp(), Scaled(), Reused()
    auto, feats = _features(mlp, "auto")
    assert (auto.projection, type(auto.featurizer).__name__) == ("tensorsketch", "FactoredFeaturizer")
    np.testing.assert_allclose(feats, _features(mlp, "tensorsketch")[1], rtol=1e-5, atol=1e-7)
    for model in (scaled, reused):  # fallbacks: the features are exactly the sparse projection's
        with caplog.at_level(logging.WARNING):
            auto, feats = _features(model, "auto")
        assert auto.projection == "sparse" and auto.projection_reason
        np.testing.assert_allclose(feats, _features(model, "sparse")[1], rtol=1e-5, atol=1e-7)


def test_projection_of_a_stored_spec() -> None:
    assert projection_of_spec({"projection": "tensorsketch", "layers": []}) == "tensorsketch"
    assert projection_of_spec({"projection": "factored"}) == "factored"
    assert projection_of_spec({"backend": "sparse", "k": 8}) == "sparse"
    assert projection_of_spec({"backend": "fast_jl"}) == "dense"
    assert projection_of_spec(None) is None and projection_of_spec({}) is None


UNCOVERED = '''
import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.net(x) * self.gain


def build(width: int = 8):
    return Scaled(width)
'''


def _manifest_projection(run) -> str | None:
    import json

    return projection_of_spec(json.loads((run / "features-train" / "manifest.json").read_text())["spec"])


def test_tda_run_decides_once_says_why_and_keeps_a_runs_recorded_projection(tmp_path, monkeypatch, capsys) -> None:
    from pipelines.cli.main import main
    from pipelines.families.base import Family
    from tda.featurizers.choice import ProjectionChoice
    from test_user_family import _project

    root = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(root / "cfg.yaml"), "--out", "covered", "--quiet"]) == 0
    assert _manifest_projection(tmp_path / "covered") == "tensorsketch"  # your MLP: covered, checked on a batch
    assert "projection tensorsketch (auto: it covers every trainable parameter" in capsys.readouterr().out

    # a model tensorsketch does not cover: sparse, and the summary names the parameter
    (root / "code" / "scaled.py").write_text(UNCOVERED)
    namespace: dict = {}
    exec(UNCOVERED, namespace)
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(namespace["build"](8).state_dict(), root / f"s{seed}.pt")
    assert main(["run", str(root / "cfg.yaml"), "--out", "uncovered", "--quiet",
                 "--set", f"model.factory={root / 'code' / 'scaled.py'}:build",
                 "--set", f"model.checkpoints=[{root / 's0.pt'}, {root / 's1.pt'}]"]) == 0
    assert _manifest_projection(tmp_path / "uncovered") == "sparse"
    out = capsys.readouterr().out
    assert "projection sparse (auto: tensorsketch does not cover this model" in out and "gain" in out

    # a run whose stored features were made when auto meant sparse keeps them: nothing is redone
    monkeypatch.setattr(Family, "auto_projection", lambda self, cfg, paths, train: ProjectionChoice("sparse", "old"))
    assert main(["run", str(root / "cfg.yaml"), "--out", "old", "--quiet"]) == 0
    assert _manifest_projection(tmp_path / "old") == "sparse"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    before = (tmp_path / "old" / "scores" / "scores.npy").read_bytes()
    assert main(["run", str(root / "cfg.yaml"), "--out", "old", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "all reused" in out and "projection sparse (auto: the projection of the stored training features)" in out
    assert (tmp_path / "old" / "scores" / "scores.npy").read_bytes() == before

