"""A scorer is one plug-in: a toy method defined and registered only here runs through ``tda run``,
``tda query`` (the torch-free path) and ``tda curate`` with no edit to any other file, and scores
as an explicit numpy formula on the stored features says."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from pipelines.layout import RunPaths
from pipelines.spec.method import Method, method_for, methods, register_method, unregister_method
from pipelines.query.lean import lean_answer
from stores import FeatureStore
from tda.errors import ConfigError
from tda.core.features import FeatureBlock, concat_blocks
from tda.scorers.base import Scorer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
NAME = "negdot"


class NegDotScorer(Scorer):
    """Minus the gradient dot product, averaged over checkpoints: ``-(1/M) sum_c <phi_c(z), phi_c,i>``."""

    name = NAME

    @staticmethod
    def _concat(block: FeatureBlock) -> np.ndarray:
        feats = np.asarray(block.feats, dtype=np.float32)  # (M, b, k)
        return np.ascontiguousarray(np.transpose(feats, (1, 0, 2)).reshape(feats.shape[1], -1))

    def transform_train(self, block: FeatureBlock) -> np.ndarray:
        return -self._concat(block) / block.feats.shape[0]

    def transform_query(self, block: FeatureBlock) -> np.ndarray:
        return self._concat(block)


@pytest.fixture
def negdot():
    """Register the toy method for one test; unregistered afterwards so other tests never see it."""
    method = register_method(Method(NAME, ("gradients",), lambda cfg, paths, family, kind: NegDotScorer(),
                                    self_influence=True, lean=lambda cfg, state: NegDotScorer()))
    yield method
    unregister_method(NAME)
    assert NAME not in methods()


def _reference(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train ids, query ids and the dense (m, n) negdot scores, from the stored features."""
    train = concat_blocks(list(FeatureStore.open(run / "features-train").iter_blocks()))
    query = concat_blocks(list(FeatureStore.open(run / "features-query").iter_blocks()))
    phi, psi = train.feats.astype(np.float64), query.feats.astype(np.float64)  # (M, n, k), (M, m, k)
    scores = -np.einsum("cmk,cnk->mn", psi, phi) / phi.shape[0]
    return train.ids, query.ids, scores


def test_a_toy_scorer_runs_end_to_end(negdot, tmp_path, capsys) -> None:
    assert method_for(NAME) is negdot and not negdot.needs_retraining and not negdot.preconditioned_queries
    run = tmp_path / "run"
    args = [str(TINY), "--out", str(run), "--set", f"score.scorer={NAME}", "--set", "data.label_noise=0.1"]
    assert main(["run", *args, "--quiet"]) == 0
    assert json.loads((run / "run.json").read_text())["config"]["score"]["scorer"] == NAME
    train_ids, query_ids, want = _reference(run)
    with np.load(run / "scores" / "topk.npz", allow_pickle=False) as z:
        top = {k: z[k] for k in z.files}
    np.testing.assert_array_equal(top["query_ids"], query_ids)
    k = top["proponent_ids"].shape[1]
    col = {int(i): c for c, i in enumerate(train_ids)}
    for row in range(len(query_ids)):
        order = np.argsort(-want[row], kind="stable")
        np.testing.assert_allclose(top["proponent_scores"][row], want[row][order[:k]], rtol=1e-4, atol=1e-6)
        got = [want[row][col[int(i)]] for i in top["proponent_ids"][row]]
        np.testing.assert_allclose(got, want[row][order[:k]], rtol=1e-4, atol=1e-6)  # ties may swap ids
        np.testing.assert_allclose(top["opponent_scores"][row], np.sort(want[row])[:k], rtol=1e-4, atol=1e-6)

    # tda query: the lean (numpy) path rebuilds the toy scorer from its saved state
    answer = lean_answer(RunPaths(run), [int(query_ids[0]), int(query_ids[3])], "query", 3)
    assert answer.scorer == NAME
    np.testing.assert_allclose(answer.top["proponent_scores"][1], np.sort(want[3])[::-1][:3], rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    assert main(["query", "--run", str(run), "--example", str(int(query_ids[0])), "-k", "3"]) == 0
    assert f"query id {int(query_ids[0])}" in capsys.readouterr().out

    # tda curate: the toy declares a self-influence ranking (of the loss: -(1/M) sum_c q_c,i^2 ||phi_c,i||^2)
    assert main(["curate", *args, "--set", "curate.retrain_seeds=0", "--quiet"]) == 0
    res = json.loads((run / "curation" / "curation.json").read_text())
    assert NAME in res["methods"] and "trak" in res["methods"]
    block = concat_blocks(list(FeatureStore.open(run / "features-train").iter_blocks()))
    phi, q = block.feats.astype(np.float64), block.q.astype(np.float64)
    self_inf = -sum(q[c] ** 2 * (phi[c] ** 2).sum(1) for c in range(len(phi))) / len(phi)
    with open(run / "curation" / "ranking.csv") as fh:
        got = {int(r["id"]): float(r[NAME]) for r in csv.DictReader(fh)}
    np.testing.assert_allclose([got[int(i)] for i in block.ids], self_inf, rtol=1e-3)


def test_registering_twice_needs_replace(negdot) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_method(negdot)
    assert register_method(negdot, replace=True) is negdot
    with pytest.raises(ConfigError, match="score.scorer is 'no-such'"):
        method_for("no-such")
    with pytest.raises(ConfigError, match=r"score.scorer is 'trk'; choose one of .* \(did you mean 'trak'\?\)"):
        method_for("trk")


@pytest.fixture
def negdot_api():
    """The toy scorer registered for the Python API (tda.scorers.register_scorer) for one test."""
    from tda.scorers import ScorerEntry, register_scorer, scorer_names
    from tda.scorers.registry import unregister_scorer

    entry = register_scorer(ScorerEntry(NAME, NegDotScorer))
    yield entry
    unregister_scorer(NAME)
    assert NAME not in scorer_names()


def test_a_toy_scorer_runs_through_the_python_api(negdot_api) -> None:
    """``tda.Attributor(scorer="negdot")`` with no other edit; its scores equal the numpy formula
    on the Attributor's own features."""
    import torch

    import tda
    from tda.models.reference import mlp

    torch.manual_seed(0)
    model = mlp(784, (16,), 10)
    checkpoints = [{k: v + 0.01 * c for k, v in model.state_dict().items()} for c in range(2)]
    rng = np.random.default_rng(0)
    train = (torch.as_tensor(rng.normal(size=(24, 784)), dtype=torch.float32), torch.as_tensor(rng.integers(0, 10, 24)))
    query = (torch.as_tensor(rng.normal(size=(5, 784)), dtype=torch.float32), torch.as_tensor(rng.integers(0, 10, 5)))
    attr = tda.Attributor(model, checkpoints, scorer=NAME, k=64, batch_size=8, projection="sparse").fit(train)
    phi = attr.train_features.block.feats.astype(np.float64)  # (M, n, k)
    psi = attr.featurize(query).feats.astype(np.float64)  # (M, m, k)
    reference = -np.einsum("cmk,cnk->mn", psi, phi) / phi.shape[0]
    np.testing.assert_allclose(attr.scores(query), reference, rtol=1e-4, atol=1e-6)


def test_an_unknown_api_scorer_names_the_closest() -> None:
    import tda

    with pytest.raises(ConfigError, match="did you mean 'trak'"):
        tda.Attributor(torch_mlp(), [torch_mlp().state_dict()], scorer="trk")


def torch_mlp():
    from tda.models.reference import mlp

    return mlp(4, (3,), 2)
