"""tda validate for every scorer: both LDS protocols, magnitude calibration and MAGIC in configs.

References: an exact line for the calibration fit; SGDRecipe (the recipe MAGIC replays) for the
classifier family's weighted training, in float64; the run's own first model for the
small-drop protocol's full-set reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli.main import main
from pipelines.families.training import train_classifier
from tda.data.loading import DEMO_DATA
from tda.errors import ConfigError
from tda.core.features import FeatureBlock
from tda.scorers.magic import SGDRecipe
from tda.scorers import PrecomputedScorer
from tda.scorers.trak import auto_lambdas
from tda.models.tasks import classification_margin
from tda.validation import calibration_report, removal_effects, sample_subsets, split_folds

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SETS = ["--set", f"data.root={DEMO_DATA / 'mnist'}", "--quiet", "--set", "train.models=1"]


def test_calibration_recovers_a_known_line() -> None:
    rng = np.random.default_rng(0)
    m, n, j = 6, 50, 40
    scores = rng.normal(size=(m, n))
    masks = sample_subsets(n, j, 0.9, seed=1)
    full = rng.normal(size=m)
    outputs = full[None] + 0.3 + 2.5 * removal_effects(scores, masks)  # actual = 0.3 + 2.5 * predicted
    np.testing.assert_allclose(removal_effects(scores, masks)[3, 2], -scores[2][~masks[3]].sum())
    rep = calibration_report(scores, masks, outputs, full, split_folds(m, j, 0.5, 0))
    assert rep["fit"]["slope"] == pytest.approx(2.5) and rep["fit"]["intercept"] == pytest.approx(0.3)
    assert rep["fit"]["group_size"] == 5 and rep["fit"]["r"] == pytest.approx(1.0)
    assert rep["report"]["mae_calibrated"] < 1e-9 < rep["report"]["mae_raw"]


def test_weighted_training_is_the_recipe_magic_replays() -> None:
    """train_classifier with data weights (a zero drops an example, batches unchanged) equals
    SGDRecipe(schedule='epoch-linear') in float64; all-ones weights equal plain training."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()

    w = torch.ones(40, dtype=torch.float64)
    w[[3, 17]] = 0.0
    kw = dict(epochs=3, lr=0.1, batch_size=8, seed=4)
    model = train_classifier(make, x, y, weights=w, **kw)
    recipe = SGDRecipe(momentum=0.9, weight_decay=5e-4, schedule="epoch-linear", **kw)
    rows = [{"x": x[i], "y": y[i]} for i in range(40)]
    state = recipe.train(make, rows, lambda b: {"x": torch.stack([r["x"] for r in b]),
                                                "y": torch.stack([r["y"] for r in b])}, weights=w)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, state[name], rtol=1e-9, atol=1e-11)
    plain = train_classifier(make, x, y, **kw).state_dict()
    ones = train_classifier(make, x, y, weights=torch.ones(40, dtype=torch.float64), **kw).state_dict()
    for name in plain:
        torch.testing.assert_close(plain[name], ones[name], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(model.state_dict()["0.weight"], plain["0.weight"])


def test_lm_training_with_unit_weights_is_plain_training() -> None:
    from pipelines.families.chargpt import GPTSpec, build_gpt2, train_lm

    tokens = torch.randint(0, 12, (20, 10), generator=torch.Generator().manual_seed(0))
    spec = GPTSpec(vocab_size=12, seq_len=10, n_layer=1, n_head=2, n_embd=8)
    runs = []
    for weights in (None, torch.ones(20), torch.cat([torch.zeros(10), torch.ones(10)])):
        model = build_gpt2(spec, seed=3)
        train_lm(model, tokens, steps=6, batch_size=8, seed=3, warmup=1, weights=weights)
        runs.append(model.state_dict())
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(runs[0][n], runs[2][n]) for n in runs[0])  # zero weights drop sequences


def test_auto_ridge_never_targets_more_than_the_rank() -> None:
    """k > n: df(lambda) can reach at most the rank n; an unreachable target is capped at 90% of
    it (no collapse to lambda = 0), a reachable one is kept."""
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(10, 40))  # n = 10 examples, k = 40
    s = torch.from_numpy(np.linalg.eigvalsh(phi.T @ phi))[None]
    for df, want in ((8.0, 8.0), (20.0, 9.0)):  # 8 < 9 is kept; 20 is capped at 0.9 * 10
        lam = float(auto_lambdas(s, df)[0])
        assert float((s / (s + lam)).sum()) == pytest.approx(want, rel=1e-6)
        assert lam > 1e-6 * float(s.max())


def test_precomputed_scorer_serves_its_matrix_and_refuses_new_queries() -> None:
    scores = np.arange(12, dtype=np.float64).reshape(3, 4)
    train = FeatureBlock(np.array([10, 11, 12, 13]), np.zeros((1, 4, 1), np.float32), np.ones((1, 4), np.float32))

    class Source:
        def iter_blocks(self, block_rows: int = 4096):
            yield train

    scorer = PrecomputedScorer(lambda progress: (scores, np.array([7, 8, 9]), np.array([10, 11, 12, 13])))
    scorer.fit(Source())
    q = FeatureBlock(np.array([9, 7]), np.zeros((1, 2, 1), np.float32), np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(scorer.transform_query(q) @ scorer.transform_train(train).T, scores[[2, 0]])
    with pytest.raises(ConfigError, match="another reverse pass"):
        scorer.transform_query(FeatureBlock(np.array([5]), np.zeros((1, 1, 1), np.float32), np.ones((1, 1), np.float32)))


def _margins_of_first_model(run: Path, n_queries: int) -> np.ndarray:
    from pipelines.config import parse_config
    from pipelines.families import collated, family_for

    cfg = parse_config(json.loads((run / "run.json").read_text())["config"])
    family = family_for(cfg)
    model = family.build_model(cfg)
    model.load_state_dict(torch.load(sorted((run / "checkpoints").glob("model-00*.pt"))[-1], weights_only=True))
    q = collated(family.datasets(cfg)["query"], family.collate(cfg))
    with torch.no_grad():
        return classification_margin(model.eval()(q["x"]), q["y"]).double().numpy()[:n_queries]


def test_small_drop_protocol_validates_magic_from_a_config(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    args = [str(TINY), "--out", str(run), *SETS, "--set", "score.scorer=magic"]
    assert main(["run", *args]) == 0
    checks = ["--set", "validate.protocol=small-drop", "--set", "validate.drop_fraction=0.05", "--set",
              "validate.subsets=16", "--set", "validate.plots=false"]
    assert main(["validate", *args, *checks]) == 0
    out = capsys.readouterr().out
    assert "small-drop protocol, batch order fixed, seed 0" in out and "magic" in out
    res = json.loads((run / "validation" / "validation.json").read_text())
    assert res["alpha"] == pytest.approx(0.95) and res["ground_truth"]["retrainings"] == 17
    assert {"magic", "trak", "trak (tuned)", "tracin", "graddot", "gradcos"} == set(res["scorers"])
    # the small-drop reference is the attributed model itself, retrained with every weight 1
    full = np.load(next((run / "ground-truth" / "runs").glob("full_r00.npy")))
    np.testing.assert_allclose(full, _margins_of_first_model(run, len(full)), rtol=1e-4, atol=1e-4)
    magic = res["scorers"]["magic"]
    assert magic["all"]["mean"] > 0.7 and magic["all"]["mean"] > res["scorers"]["graddot"]["all"]["mean"]
    assert 0.5 < magic["calibration"]["fit"]["slope"] < 2.0  # MAGIC's effects are near their true size
    assert main(["query", "--run", str(run), "--example", "3", "-k", "2"]) == 0  # a stored query is served
    capsys.readouterr()
    assert main(["query", "--run", str(run), "--example", "3", "--split", "train"]) == 2  # ids would collide
    assert "run's own queries only" in capsys.readouterr().err
    # other queries with the same ids (a different split): MAGIC is recomputed, never served stale
    before = np.load(run / "scores" / "scores.npy")
    assert main(["run", *args, "--set", "data.query_split=train"]) == 0
    after = np.load(run / "scores" / "scores.npy")
    assert after.shape == before.shape and not np.allclose(after, before)
    self_scores = np.diag(after[:, :20])  # the queries are now training rows 0..19: each raises its own margin
    assert (self_scores > 0).all() and (after.argmax(axis=1) == np.arange(20)).mean() >= 0.4
    capsys.readouterr()


def test_validate_scorer_choice_and_protocol_are_checked(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", str(TINY), "--out", str(run), *SETS]) == 0
    assert main(["validate", str(TINY), "--out", str(run), *SETS, "--set", "validate.scorers=[repsim]"]) == 2
    err = capsys.readouterr().err
    assert "validate.scorers names ['repsim']" in err and "'gradients'" in err and "graddot" in err
    assert main(["validate", str(TINY), "--out", str(run), *SETS, "--set", "validate.protocol=smalldrop"]) == 2
    assert "use 'classic' or 'small-drop'" in capsys.readouterr().err
    assert not (run / "ground-truth").exists()  # refused before any retraining
    assert main(["validate", str(TINY), "--out", str(run), *SETS, "--set", "validate.scorers=[graddot]",
                 "--set", "validate.subsets=4", "--set", "validate.plots=false"]) == 0
    res = json.loads((run / "validation" / "validation.json").read_text())
    assert list(res["scorers"]) == ["graddot"] and "lds" not in res
    assert "noise" not in res["ground_truth"]  # one model per subset: no noise ceiling to estimate
    capsys.readouterr()
    shutil.rmtree(run / "ground-truth")  # another ground truth spec needs its own folder
    assert main(["validate", str(TINY), "--out", str(run), *SETS, "--set", "validate.scorers=[graddot]",
                 "--set", "validate.subsets=6", "--set", "validate.models_per_subset=2",
                 "--set", "validate.plots=false"]) == 0
    noise = json.loads((run / "validation" / "validation.json").read_text())["ground_truth"]["noise"]
    assert -1 <= noise["single_model_agreement"] <= 1 and 0 <= noise["lds_ceiling"] <= 1
    assert f"no scorer can exceed LDS about {noise['lds_ceiling']:.2f}" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        from pipelines.config import parse_config

        parse_config({"validate": {"drop_fraction": 0.7}})


def test_ekfac_scorer_from_a_config_equals_the_python_api(tmp_path) -> None:
    """`score.scorer: ekfac` through the run's stages gives the scores of EKFACAttributor on the
    same checkpoints, data and projection; a dense projection is refused with the fix."""
    from pipelines.config import parse_config
    from pipelines.families import family_for
    from tda.scorers.ekfac.features import EKFACAttributor

    run = tmp_path / "run"
    sets = [*SETS, "--set", "score.scorer=ekfac", "--set", "featurize.projection=factored", "--set",
            "featurize.k_in=8", "--set", "featurize.k_out=8", "--set", "train.models=2"]
    assert main(["run", str(TINY), "--out", str(run), *sets]) == 0
    cfg = parse_config(json.loads((run / "run.json").read_text())["config"])
    family = family_for(cfg)
    entries = json.loads((run / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    states = [torch.load(run / "checkpoints" / e["file"], weights_only=True) for e in entries]
    assert len(states) == 2
    data = family.datasets(cfg)
    attr = EKFACAttributor(family.build_model(cfg), states, family.collate(cfg), task=family.task(cfg), k_in=8,
                           k_out=8, batch_size=cfg.featurize.batch_size).fit(data["train"])
    want = attr.scores(data["query"])
    got = np.load(run / "scores" / "scores.npy")
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert main(["run", str(TINY), "--out", str(tmp_path / "dense"), *SETS, "--set", "score.scorer=ekfac"]) == 2
