"""Factored (Kronecker) projection: identity factors give exactly the per-example gradients
(float64, against the vmap path) for linear, Conv1D and Conv2d layers (MLP, CNN, GPT-2, the
diffusion UNet), the scale makes E<phi, phi'> = (k/d)<g, g'>, matrices are a pure function of
(seed, checkpoint, layer), unsupported layers are skipped by the documented rule or refused when
named, and scores rank like the dense projection's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tda.api import Attributor
from tda.data.loading import iter_batches
from tda.errors import ConfigError, ShapeError
from tda.featurizers.factored import (FactoredFeaturizer, FactoredProjector, capture_layers, factored_layers,
                          factored_selection)
from tda.core.features import ArrayFeatures, FeatureBlock
from tda.featurizers.gradient import Featurizer
from tda.gradients.per_example import per_example_grads
from tda.core.kernel import score_matrix
from tda.scorers import GradDotScorer, TRAKScorer
from tda.models.tasks import ClassificationTask


def _dense_reference(model, task, batch, layers) -> torch.Tensor:
    """(B, d) per-example gradients from tda.gradients.per_example, laid out like the factored features."""
    grads = per_example_grads(model, task, batch, [p for s in layers for p in s.params])
    parts = []
    for s in layers:
        w = grads[f"{s.name}.weight"]
        if s.layout == "conv1d":
            w = w.transpose(1, 2)  # Conv1D stores (in, out)
        w = w.reshape(w.shape[0], w.shape[1], -1)  # Conv2d: (B, out, C_in kh kw), the unfold order
        if s.bias:
            w = torch.cat([w, grads[f"{s.name}.bias"].unsqueeze(2)], dim=2)  # bias column last
        parts.append(w.reshape(w.shape[0], -1))
    return torch.cat(parts, dim=1)


def test_identity_factors_equal_dense_gradients_mlp_float64(make_mlp, tiny_data) -> None:
    model = make_mlp(seed=0, in_dim=5, hidden=(7, 6), out_dim=3).double()
    x, y = tiny_data(9, in_dim=5, classes=3, seed=2)
    batch, task = {"x": x.double(), "y": y}, ClassificationTask()
    layers = factored_layers(model)
    assert [s.name for s in layers] == ["0", "2", "4"]
    proj = FactoredProjector(layers, None, None)
    assert proj.scales == [1.0] * 3 and proj.k == proj.dim == sum(p.numel() for p in model.parameters())
    feats = proj.project(capture_layers(model, task, batch, layers), checkpoint=0)
    assert feats.dtype == torch.float64
    torch.testing.assert_close(feats, _dense_reference(model, task, batch, layers), rtol=1e-12, atol=1e-14)


def test_identity_factors_equal_dense_gradients_gpt2_float64() -> None:
    pytest.importorskip("transformers")
    from pipelines.families.chargpt import GPTSpec, build_gpt2
    from tda.models.lm import LMTask

    model = build_gpt2(GPTSpec(vocab_size=11, seq_len=12, n_layer=2, n_head=2, n_embd=8), seed=0).double()
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 12)
    mask[:, 0] = 0
    mask[1, :6] = 0  # a completion after a prompt
    batch, task = {"input_ids": torch.randint(0, 11, (4, 12), generator=gen), "loss_mask": mask}, LMTask()
    layers = factored_layers(model)
    assert {s.layout for s in layers} == {"conv1d", "linear"} and layers[-1].name == "lm_head"
    feats = FactoredProjector(layers, None, None).project(capture_layers(model, task, batch, layers), 0)
    torch.testing.assert_close(feats, _dense_reference(model, task, batch, layers), rtol=1e-10, atol=1e-13)


def _assert_identity_equals_dense(model, task, batch, layers, rtol: float) -> None:
    """Identity factors: features and exact gradient norms equal the float64 dense reference."""
    proj = FactoredProjector(layers, None, None)
    caps = capture_layers(model, task, batch, layers)
    ref = _dense_reference(model, task, batch, layers)
    torch.testing.assert_close(proj.project(caps, 0), ref, rtol=rtol, atol=1e-14)
    torch.testing.assert_close(proj.grad_norms(caps), ref.norm(dim=1), rtol=rtol, atol=1e-14)


def _odd_cnn() -> torch.nn.Sequential:
    """A float64 CNN on flat (B, 64) inputs with every unfold case: stride, dilation, reflect
    padding, asymmetric 'same' padding of an even kernel, no bias, a 1x1 convolution."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"), nn.ReLU(),  # 3x4x4
        nn.Conv2d(3, 4, (3, 2), padding="same", bias=False), nn.Tanh(),  # 4x4x4
        nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(32, 3),
    ).double().eval()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_identity_factors_equal_dense_gradients_cnn_float64(tiny_data) -> None:
    model = _odd_cnn()
    x, y = tiny_data(6, in_dim=64, classes=3, seed=1)
    batch, task = {"x": x.double(), "y": y}, ClassificationTask()
    layers = factored_layers(model)
    assert [(s.name, s.layout, s.d_in, s.d_out) for s in layers] == [
        ("1", "conv2d", 10, 3), ("3", "conv2d", 18, 4), ("5", "conv2d", 5, 2), ("7", "linear", 33, 3)]
    _assert_identity_equals_dense(model, task, batch, layers, rtol=1e-12)


def test_identity_factors_equal_dense_gradients_unet_float64() -> None:
    """Every convolution and linear layer of the diffusion UNet; its GroupNorms are skipped."""
    from pipelines.families.unet import TinyUNet
    from tda.featurizers.diffusion import DiffusionTask, NoiseSchedule

    torch.manual_seed(0)
    model = TinyUNet((4, 8), in_channels=1, time_dim=4, head=2).double().eval()
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(3, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1, "t": torch.tensor([0, 17, 49]),
             "noise": torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)}
    task = DiffusionTask(NoiseSchedule(T=50, beta_start=1e-3, beta_end=0.2), "loss")
    layers, skipped = factored_selection(model)
    kinds = {s.layout for s in layers}
    assert kinds == {"conv2d", "linear"} and len(layers) == 26
    assert skipped and all("norm" in n or n.startswith("out.0.") for n in skipped)  # the GroupNorms
    covered = {p for s in layers for p in s.params}
    assert covered | set(skipped) == {n for n, _ in model.named_parameters()}
    _assert_identity_equals_dense(model, task, batch, layers, rtol=1e-10)


def test_diffusion_featurizer_factored_identity_equals_dense_gradients() -> None:
    """DiffusionFeaturizer(projection='factored') with identity factors: the draw-averaged
    gradient (D-TRAK layout), per-draw [gradient, exact norm] slots (TracIn layout) and the
    pooled [mean gradient, its exact norm] (train_draws: grid); chunks keep an example's draws."""
    from pipelines.families.unet import TinyUNet
    from tda.featurizers.diffusion import DiffusionFeaturizer, DiffusionTask, GridDraws, NoiseSchedule, noise_from_seeds

    torch.manual_seed(1)
    model = TinyUNet((4, 8), in_channels=1, time_dim=4, head=2).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = DiffusionTask(NoiseSchedule(T=50, beta_start=1e-3, beta_end=0.2), "loss")
    draws = GridDraws(50, timesteps=3, seed=2)
    x, ids = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1, np.array([4, 9])
    t, seeds = draws(0, ids)  # (2, 3) each: rows example-major, as the featurizer repeats them
    big = {"x": x.double().repeat_interleave(3, 0), "t": torch.from_numpy(t.reshape(-1)),
           "noise": noise_from_seeds(seeds.reshape(-1), x.shape[1:]).double()}
    ref64 = copy.deepcopy(model).double()
    ref = _dense_reference(ref64, task, big, factored_layers(ref64)).reshape(2, 3, -1)  # (B, S, d covered)
    mean = ref.mean(dim=1)
    wants = {"mean": mean, "slots": torch.cat([ref, ref.norm(dim=2, keepdim=True)], 2).reshape(2, -1),
             "pooled": torch.cat([mean, mean.norm(dim=1, keepdim=True)], 1)}
    for mode, want in wants.items():
        fz = DiffusionFeaturizer(model, task, draws, mode, projection="factored", k_in=None, k_out=None,
                                 chunk_size=4)  # 4 rows: rounded to 3, one example's draws, when pooling
        ((_, phi, _),) = fz.featurize(state, 0, [(ids, {"x": x})])
        assert fz.feature_dim == phi.shape[1] == want.shape[1]
        np.testing.assert_allclose(phi, want.numpy(), rtol=2e-4, atol=2e-6, err_msg=mode)
    spec = fz.spec()
    assert spec["projection"] == "factored" and spec["mode"] == "pooled" and "down.0.norm1.weight" in spec["skipped"]


def test_tied_lm_head_is_skipped() -> None:
    pytest.importorskip("transformers")
    from pipelines.families.chargpt import GPTSpec, build_gpt2

    model = build_gpt2(GPTSpec(vocab_size=11, seq_len=12, n_layer=1, n_embd=8, tie_embeddings=True))
    layers, skipped = factored_selection(model)
    assert "lm_head" not in [s.name for s in layers]
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= set(skipped)
    with pytest.raises(ConfigError, match="'lm_head' cannot be projected factored: .*shared"):
        factored_layers(model, ["lm_head"])
    assert [s.name for s in factored_layers(model, ["transformer.h.0.mlp"])] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_featurizer_matches_projector_and_is_deterministic(make_mlp, tiny_data) -> None:
    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(10, in_dim=5, classes=3, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(np.arange(10), {"x": x, "y": y})]

    def run(seed: int, checkpoint: int, chunk: int | None = None) -> np.ndarray:
        fz = FactoredFeaturizer(model, ClassificationTask(), k_in=3, k_out=2, seed=seed, chunk_size=chunk)
        return np.concatenate([phi for _, phi, _ in fz.featurize(state, checkpoint, batches)])

    a = run(0, 0)
    assert a.shape == (10, 2 * 2 * 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, run(0, 0))
    np.testing.assert_allclose(a, run(0, 0, chunk=3), rtol=1e-5, atol=1e-6)  # batch split
    assert not np.allclose(a, run(1, 0)) and not np.allclose(a, run(0, 1))
    proj = FactoredProjector(factored_layers(model), 3, 2, seed=0)
    p0 = proj.factor(0, proj.layers[0], "in")
    assert p0.shape == (6, 3) and set(p0.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(p0, FactoredProjector(factored_layers(model), 3, 2, seed=0).factor(0, proj.layers[0], "in"))
    assert not torch.equal(p0, proj.factor(0, proj.layers[1], "in")[:6])  # layers differ
    spec = FactoredFeaturizer(model, ClassificationTask(), 3, 2).spec()
    assert spec["projection"] == "factored" and spec["k"] == 12 and spec["layers"] == ["0", "2"]


def test_scale_makes_inner_products_unbiased(make_mlp, tiny_data) -> None:
    """Averaged over seeds, ||phi||^2 -> (k/d) ||g||^2, the dense projector's expectation, also
    when a factor at least as wide as its layer is replaced by the identity."""
    model = make_mlp(seed=0, in_dim=6, hidden=(8,), out_dim=4).double()
    x, y = tiny_data(1, in_dim=6, classes=4, seed=4)
    task = ClassificationTask()
    layers = factored_layers(model)
    caps = capture_layers(model, task, {"x": x.double(), "y": y}, layers)
    g = FactoredProjector(layers, None, None).project(caps, 0)
    target = float(g[0] @ g[0])
    for kind, k_out in (("rademacher", 2), ("gaussian", 2), ("rademacher", 5)):  # 5 >= d_out of layer 2: identity
        vals = []
        for seed in range(300):
            proj = FactoredProjector(layers, 3, k_out, seed=seed, kind=kind)
            phi = proj.project(caps, 0)
            vals.append(float(phi[0] @ phi[0]) * proj.dim / proj.k)  # undo the k/d factor
        assert np.mean(vals) == pytest.approx(target, rel=0.15)
    assert proj.sizes == [5 * 3, 4 * 3] and proj.factor(0, proj.layers[1], "out") is None


def test_bad_settings_are_rejected(make_mlp) -> None:
    model = make_mlp()
    with pytest.raises(ConfigError, match="names no layer the factored projection supports"):
        factored_layers(model, ["nope"])
    with pytest.raises(ConfigError, match="module names or prefixes, not parameter names"):
        factored_layers(model, ["0.weight"])
    with pytest.raises(ConfigError, match="k_in"):
        FactoredProjector(factored_layers(model), 0, 4)
    with pytest.raises(ConfigError, match="kind"):
        FactoredProjector(factored_layers(model), 2, 2, kind="sparse")
    with pytest.raises(ConfigError, match="no .*layer"):
        factored_layers(torch.nn.Sequential(torch.nn.ReLU()))


def test_unsupported_layers_are_skipped_or_refused_by_name(tiny_data) -> None:
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (4, 2, 2)), nn.Conv2d(4, 4, 1, groups=2), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 3, 2), nn.Flatten(), nn.Linear(3, 3)).eval()
    layers, skipped = factored_selection(model)
    assert [s.name for s in layers] == ["3", "5"] and skipped == ["1.weight", "1.bias", "2.weight", "2.bias"]
    with pytest.raises(ConfigError, match=r"'1' cannot be projected factored: .*grouped convolution \(groups=2\)"):
        factored_layers(model, ["1"])
    with pytest.raises(ConfigError, match="'2' cannot be projected factored: .*GroupNorm"):
        factored_layers(model, ["2", "3"])
    inplace = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).eval()
    x, y = tiny_data(3, in_dim=5, classes=3)
    with pytest.raises(ShapeError, match="modified in place"):
        capture_layers(inplace, ClassificationTask(), {"x": x, "y": y}, factored_layers(inplace))


@pytest.fixture(scope="module")
def lm_setup():
    """A tiny char GPT-2 briefly trained on 160 sequences, and 12 held-out queries."""
    pytest.importorskip("transformers")
    from pipelines.families.chargpt import CharVocab, GPTSpec, build_gpt2, dataset_tokens, lm_sequences, train_lm

    torch.set_num_threads(1)
    gen = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "sun", "is", "hot", "we", "go"]
    text = " ".join(gen.choice(words, size=2500)) + "."
    vocab = CharVocab.from_text(text)
    train = lm_sequences(text, vocab, 24, n=160)
    query = lm_sequences(text, vocab, 24, n=12, start=8000)
    model = build_gpt2(GPTSpec(vocab_size=vocab.size, seq_len=24, n_layer=1, n_head=2, n_embd=32), seed=0)
    train_lm(model, dataset_tokens(train), steps=60, lr=1e-2, batch_size=32, warmup=5)
    return model, train, query


def _scores(tr: np.ndarray, q: np.ndarray, scorer) -> np.ndarray:
    source = ArrayFeatures(FeatureBlock(np.arange(len(tr)), tr[None], np.ones((1, len(tr)))), [0])
    scorer.fit(source)
    return score_matrix(FeatureBlock(np.arange(len(q)), q[None], np.ones((1, len(q)))), scorer, source)


def test_rank_correlation_with_dense_at_equal_k(lm_setup, spearman_rows) -> None:
    from tda.models.lm import LMTask, lm_collate

    model, train, query = lm_setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = LMTask()

    def feats(fz):
        return [np.concatenate([phi for _, phi, _ in fz.featurize(state, 0, iter_batches(ds, lm_collate, 80))])
                for ds in (train, query)]

    factored = FactoredFeaturizer(model, task, k_in=16, k_out=16, seed=0)
    dense = Featurizer(model, task, k=factored.k, seed=0, param_names=factored.names)
    exact = FactoredFeaturizer(model, task, k_in=None, k_out=None)  # the unprojected gradients
    f, d, e = feats(factored), feats(dense), feats(exact)
    sf, sd, se = (_scores(*pair, GradDotScorer()) for pair in (f, d, e))
    fac_exact, dense_exact = spearman_rows(sf, se).mean(), spearman_rows(sd, se).mean()
    assert spearman_rows(sf, sd).mean() > 0.75
    assert fac_exact > 0.75 and fac_exact > dense_exact - 0.2, (fac_exact, dense_exact)
    # TRAK (exact TRAK would need a d x d solve: compare the two projections only)
    assert spearman_rows(_scores(*f, TRAKScorer()), _scores(*d, TRAKScorer())).mean() > 0.5


def test_cnn_rank_correlation_with_dense_at_equal_k(tiny_data, spearman_rows) -> None:
    """A small trained CNN (two convolutions, one linear layer): Grad-Dot scores of factored
    features rank like those of the exact gradients and of the dense projection at equal k."""
    from pipelines.families.classifier import small_cnn
    from pipelines.families.training import train_classifier

    x, y = tiny_data(230, in_dim=64, classes=3, seed=0)
    model = train_classifier(lambda: small_cnn((1, 8, 8), [8, 16], 3), x[:200], y[:200], epochs=2, lr=0.05,
                             batch_size=32, seed=0)
    state, task = {k: v.clone() for k, v in model.state_dict().items()}, ClassificationTask()

    def feats(fz):
        return [np.concatenate([phi for _, phi, _ in fz.featurize(state, 0, [(np.arange(len(a)), {"x": a, "y": b})])])
                for a, b in ((x[:200], y[:200]), (x[200:], y[200:]))]

    factored = FactoredFeaturizer(model, task, k_in=32, k_out=16, seed=0)
    assert [s.layout for s in factored.layers] == ["conv2d", "conv2d", "linear"]
    dense = Featurizer(model, task, k=factored.k, seed=0, param_names=factored.names)
    exact = FactoredFeaturizer(model, task, k_in=None, k_out=None)
    sf, sd, se = (_scores(*feats(fz), GradDotScorer()) for fz in (factored, dense, exact))
    fac_exact, dense_exact = spearman_rows(sf, se).mean(), spearman_rows(sd, se).mean()
    assert spearman_rows(sf, sd).mean() > 0.8
    assert fac_exact > 0.8 and fac_exact > dense_exact - 0.15, (fac_exact, dense_exact)


def test_attributor_accepts_factored_featurizer(make_mlp, tiny_data) -> None:
    """The Python API path: swap the Attributor's featurizer for a factored one."""
    import datasets

    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(40, in_dim=5, classes=3, seed=5)
    ds = datasets.Dataset.from_dict({"id": np.arange(40), "x": x.numpy().tolist(), "y": y.numpy()})

    def collate(rows):
        return {"x": torch.tensor(np.asarray(rows["x"], dtype=np.float32)), "y": torch.tensor(rows["y"])}

    attr = Attributor(model, [model.state_dict()], collate=collate, scorer=GradDotScorer())
    attr.featurizer = FactoredFeaturizer(model, ClassificationTask(), k_in=4, k_out=3)
    attr.fit(ds)
    scores = attr.scores(ds.select(range(5)))
    assert scores.shape == (5, 40) and np.isfinite(scores).all()
    phi, _ = attr.featurizer.featurize_batch(collate(ds[:]), np.arange(40), checkpoint=0)
    np.testing.assert_allclose(scores, phi[:5] @ phi.T, rtol=1e-4, atol=1e-6)  # Grad-Dot, M = 1
