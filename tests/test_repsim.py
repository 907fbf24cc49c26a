"""RepSim and hidden representations (docs/methods.md sections 1 and 5) against manual forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from stores.index import build_index
from tda.api import Attributor
from tda.data.loading import mnist_collate
from tda.errors import ConfigError, DataError, ShapeError
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.core.kernel import score_matrix
from tda.models.reference import mlp
from tda.featurizers.representations import RepresentationFeaturizer, hidden_states
from tda.scorers import RepSimScorer, make_scorer


def _relu_hidden(state: dict[str, Tensor], x: Tensor) -> np.ndarray:
    """Manual float64 forward of ``mlp`` up to module "1" (the first ReLU): (B, hidden)."""
    w, b = state["0.weight"].double().numpy(), state["0.bias"].double().numpy()
    return np.maximum(x.double().numpy() @ w.T + b, 0.0)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1, keepdims=True), np.linalg.norm(b, axis=1, keepdims=True)
    ua = np.divide(a, na, out=np.zeros_like(a), where=na > 0)
    ub = np.divide(b, nb, out=np.zeros_like(b), where=nb > 0)
    return ua @ ub.T


def _featurize(feat: RepresentationFeaturizer, states: list[dict], x: Tensor, y: Tensor,
               first_id: int = 0) -> FeatureBlock:
    per_ckpt = []
    for c, state in enumerate(states):
        batches = [(np.arange(lo, min(lo + 4, len(x))) + first_id, {"x": x[lo:lo + 4], "y": y[lo:lo + 4]})
                   for lo in range(0, len(x), 4)]
        parts = list(feat.featurize(state, c, batches))
        for ids, h, q in parts:
            assert ids.dtype == np.int64 and h.dtype == np.float32 and q.dtype == np.float32
            assert h.shape == (len(ids), 7) and np.all(q == 1.0)
        per_ckpt.append(np.concatenate([h for _, h, _ in parts]))
    ids = np.arange(len(x)) + first_id
    return FeatureBlock(ids, np.stack(per_ckpt), np.ones((len(states), len(x))))


def test_hidden_states_equal_manual_forward(make_mlp, tiny_data) -> None:
    model = make_mlp(seed=1).train()
    x, _ = tiny_data(9)
    h = hidden_states(model, "1", x)
    assert h.shape == (9, 7) and h.dtype == torch.float32
    np.testing.assert_allclose(h.numpy(), _relu_hidden(model.state_dict(), x), rtol=1e-5, atol=1e-6)
    assert model.training  # mode restored
    assert not model[1]._forward_hooks  # hook removed


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_repsim_equals_numpy_similarity_of_hidden_states(make_mlp, tiny_data, metric: str) -> None:
    model = make_mlp(seed=0)
    states = [make_mlp(seed=s).state_dict() for s in (1, 2)]
    x, y = tiny_data(17, seed=5)
    feat = RepresentationFeaturizer(model, "1")
    train = _featurize(feat, states, x[:13], y[:13], first_id=100)
    query = _featurize(feat, states, x[13:], y[13:])
    got = score_matrix(query, RepSimScorer(metric), ArrayFeatures(train, [0, 1]), block_rows=5)
    sim = _cosine if metric == "cosine" else (lambda a, b: a @ b.T)
    ref = np.mean([sim(_relu_hidden(s, x[13:]), _relu_hidden(s, x[:13])) for s in states], axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if metric == "cosine":
        assert np.abs(got).max() <= 1 + 1e-6
        self_sim = np.diag(score_matrix(train, RepSimScorer(), ArrayFeatures(train, [0, 1])))
        nonzero = (np.linalg.norm(train.feats, axis=2) > 0).mean(axis=0)  # zero ReLU rows -> 0
        np.testing.assert_allclose(self_sim, nonzero, atol=1e-6)


class _Seq(nn.Module):
    """Tokens (B, T) -> embedding -> ``proj`` (B, T, 4) -> mean over T -> ``head`` (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.proj(self.emb(tokens))  # (B, T, 4)
        return self.head(h.mean(dim=1))  # (B, 2)


def test_sequence_outputs_are_mean_pooled_over_non_pad_tokens() -> None:
    torch.manual_seed(0)
    model = _Seq()
    tokens = torch.randint(0, 20, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        full = model.proj(model.emb(tokens)).double()  # (3, 5, 4)
    got = hidden_states(model, "proj", tokens, attention_mask=mask)
    np.testing.assert_allclose(got[0].numpy(), full[0, :3].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), full[1].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2].numpy(), 0.0)  # all padding: zeros, not NaN
    no_mask = hidden_states(model, "proj", tokens)
    np.testing.assert_allclose(no_mask.numpy(), full.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ShapeError, match=r"\(B, T\) = \(3, 5\)"):
        hidden_states(model, "proj", tokens, attention_mask=mask[:, :4])


def test_tuple_and_image_outputs() -> None:
    torch.manual_seed(0)

    class Block(nn.Module):
        def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
            return h * 2, h.sum()

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Block(), nn.Flatten(), nn.Linear(18, 3))
    x = torch.randn(4, 1, 5, 5)
    with torch.no_grad():
        conv = model[0](x)  # (4, 2, 3, 3)
    flat = conv.reshape(4, -1).numpy()  # (4, 18): image outputs are flattened per example
    np.testing.assert_allclose(hidden_states(model, "0", x).numpy(), flat, rtol=1e-6)
    np.testing.assert_allclose(hidden_states(model, "1", x).numpy(), 2 * flat, rtol=1e-6)  # tuple


def test_forward_stops_at_the_module() -> None:
    class Boom(nn.Module):
        def forward(self, h: Tensor) -> Tensor:
            raise RuntimeError("layers after the representation must not run")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), Boom())
    assert hidden_states(model, "0", torch.randn(2, 3)).shape == (2, 2)


def test_unknown_or_unused_module_raises(make_mlp) -> None:
    model = make_mlp()
    with pytest.raises(ConfigError, match=r"available module names: '0', '1', '2'"):
        hidden_states(model, "encoder.layer.3", torch.randn(2, 5))
    with pytest.raises(ConfigError, match="available module names"):
        RepresentationFeaturizer(model, "fc1")
    seq = _Seq()
    seq.unused = nn.Linear(2, 2)  # registered but never called by forward
    with pytest.raises(DataError, match="not called"):
        hidden_states(seq, "unused", torch.randint(0, 20, (2, 3)))


def test_featurizer_names_missing_input_column(make_mlp) -> None:
    feat = RepresentationFeaturizer(make_mlp(), "1", input_key="pixels")
    with pytest.raises(ShapeError, match="input_key"):
        next(feat.featurize(make_mlp().state_dict(), 0, [(np.arange(2), {"x": torch.randn(2, 5)})]))


def test_bad_metric_raises() -> None:
    with pytest.raises(ConfigError, match="cosine"):
        RepSimScorer("euclidean")


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_faiss_top_k_equals_brute_force(rng, metric: str) -> None:
    feats = rng.standard_normal((2, 40, 6)).astype(np.float32)
    train = FeatureBlock(np.arange(40) + 500, feats, np.ones((2, 40)))
    query = FeatureBlock(np.arange(4), rng.standard_normal((2, 4, 6)).astype(np.float32), np.ones((2, 4)))
    source = ArrayFeatures(train, [0, 1])
    scorer = make_scorer("repsim", metric=metric)
    brute = score_matrix(query, scorer, source)
    got = build_index(source, scorer, block_rows=7).top_k(scorer.transform_query(query), 5)
    srt, tol = np.sort(brute, axis=1), 1e-5 * np.abs(brute).max()
    np.testing.assert_allclose(got.proponent_scores, srt[:, ::-1][:, :5], atol=tol)
    np.testing.assert_allclose(got.opponent_scores, srt[:, :5], atol=tol)
    cols = got.proponent_ids - 500  # training ids -> columns; compare scores (ties allowed)
    np.testing.assert_allclose(np.take_along_axis(brute, cols, axis=1), got.proponent_scores, atol=tol)


def test_attributor_with_representation_featurizer(rng) -> None:
    import datasets

    def data(n: int, first: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "id": list(range(first, first + n)),
            "image": rng.integers(0, 256, size=(n, 784), dtype=np.uint8).tolist(),
            "label": rng.integers(0, 10, size=n).tolist(),
        })

    train, query = data(12, 100), data(3, 0)
    torch.manual_seed(0)
    model = mlp(784, (8,), 10)
    attr = Attributor(model, [model.state_dict()], collate=mnist_collate, scorer=RepSimScorer(), batch_size=5)
    attr.featurizer = RepresentationFeaturizer(model, "1")  # representations instead of gradients
    attr.fit(train)
    scores = attr.scores(query)
    x = {name: mnist_collate(d[:])["x"] for name, d in (("train", train), ("query", query))}
    ref = _cosine(_relu_hidden(model.state_dict(), x["query"]), _relu_hidden(model.state_dict(), x["train"]))
    np.testing.assert_allclose(scores, ref, atol=1e-5)
