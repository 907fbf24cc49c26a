"""TensorSketch projection (tda.projections.tensorsketch): both ways of computing it (FFT of the two
CountSketches, and the formed gradient scattered by the combined hash) equal ``S^T g`` for the
explicit sketch matrix built entry by entry from the projector's hashes, against float64
per-example gradients from a loop of autograd (MLP, CNN, a linear layer over a sequence and a
layer called twice; embeddings, a tied LM head and layer norms of a 1-layer GPT-2, BatchNorm,
GroupNorm, LayerNorm and RMSNorm of a CNN, every parameter exactly once); an uncovered parameter
is refused; inner products are unbiased with CountSketch's order of variance; hashes
are a pure function of (seed, checkpoint, layer, side); the wiring (config run, Attributor)
works and bad input is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.cli.main import main
from pipelines.config import load_config
from pipelines.run import feature_fingerprint
from stores import FeatureStore
from tda.api import Attributor
from tda.errors import ConfigError, ShapeError
from tda.featurizers.factored import FactoredFeaturizer, LayerSpec, capture_layers, factored_selection
from tda.models.lm import LMTask
from tda.projections.sketch_layers import tensorsketch_selection
from tda.models.tasks import ClassificationTask
from tda.projections.tensorsketch import TensorSketchProjector

ROOT = Path(__file__).resolve().parents[1]


class _Sequence(nn.Module):
    """(B, T*4) -> tokens (B, T, 4) -> a linear over every token, then one linear used twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.mix, self.head = nn.Linear(4, 5), nn.Linear(5, 5, bias=False), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.tok(x.reshape(x.shape[0], -1, 4)))  # (B, T, 5)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))  # two calls of one layer
        return self.head(h.mean(dim=1))  # (B, 3)


def _cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Unflatten(1, (2, 6, 6)), nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 2, 2, bias=False), nn.Flatten(), nn.Linear(8, 3)).double().eval()


def _mlp() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def _looped_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[LayerSpec]) -> torch.Tensor:
    """(B, d) per-example gradients, one autograd call per example, laid out as G = (d_out, d_in)
    row-major per layer with the bias column last (the coordinates the sketch hashes)."""
    modules, task, rows = dict(model.named_modules()), ClassificationTask(), []
    for b in range(x.shape[0]):
        f = task.output(model, {"x": x[b: b + 1], "y": y[b: b + 1]}).sum()
        params = [p for s in layers for p in (modules[s.name].weight, modules[s.name].bias) if p is not None]
        grads = iter(torch.autograd.grad(f, params))
        parts = []
        for s in layers:
            w = next(grads).reshape(s.d_out, -1)  # conv: (out, C_in kh kw), the unfold order
            parts.append(torch.cat([w, next(grads)[:, None]], dim=1) if s.bias else w)
        rows.append(torch.cat([p.reshape(-1) for p in parts]))
    return torch.stack(rows)


def _explicit_matrix(proj: TensorSketchProjector, checkpoint: int) -> torch.Tensor:
    """(d, k) ``sqrt(k/d) S``, entry by entry: S[(L, i, j), (h_out(i) + h_in(j)) mod k] = s_out(i) s_in(j)."""
    m, row = torch.zeros(proj.dim, proj.k, dtype=torch.float64), 0
    for layer in proj.layers:
        h_in, s_in = proj.hashes(checkpoint, layer, "in")
        h_out, s_out = proj.hashes(checkpoint, layer, "out")
        for i in range(layer.d_out):
            for j in range(layer.d_in):
                m[row, (h_out[i] + h_in[j]) % proj.k] += float(s_out[i]) * float(s_in[j])
                row += 1
    return m * (proj.k / proj.dim) ** 0.5


CASES = {"mlp": (_mlp, 5), "cnn": (_cnn, 72), "sequence": (lambda: _Sequence().double().eval(), 12)}


@pytest.mark.parametrize("method", ["fft", "form"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [16, 13])
def test_equals_explicit_sketch_of_looped_gradients_float64(case: str, method: str, k: int) -> None:
    build, width = CASES[case]
    model = build()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, width, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    layers, skipped = factored_selection(model)
    assert skipped == []
    proj = TensorSketchProjector(layers, k=k, seed=7, method=method)
    caps = capture_layers(model, ClassificationTask(), {"x": x, "y": y}, layers)
    phi = proj.project(caps, checkpoint=2)
    g = _looped_gradients(model, x, y, layers)
    assert phi.shape == (5, k) and phi.dtype == torch.float64 and g.shape[1] == proj.dim
    torch.testing.assert_close(phi, g @ _explicit_matrix(proj, 2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(proj.grad_norms(caps), g.norm(dim=1), rtol=1e-10, atol=1e-12)


def _explicit_blocks(proj: TensorSketchProjector, checkpoint: int) -> dict[str, torch.Tensor]:
    """Per covered parameter, its (numel, k) block of ``S`` from the hashes: a weight (rows, cols)
    entry (i, j) to (h_out(i) + h_in(j)) mod k, a linear bias i to (h_out(i) + h_in(last)) mod k, a
    norm's vectors to their own CountSketch. A shared weight gets one block (every use hashes alike)."""
    blocks, k = {}, proj.k

    def block(buckets: np.ndarray, signs: np.ndarray) -> torch.Tensor:
        buckets = torch.from_numpy(buckets.reshape(-1) % k)
        m = torch.zeros(len(buckets), k, dtype=torch.float64)
        m[torch.arange(len(buckets)), buckets] = torch.from_numpy(signs * 1.0)
        return m

    for s in proj.layers:
        if s.layout in ("layernorm", "channelnorm"):
            blocks.update({p: block(*proj.vector_hashes(checkpoint, p, s.d_out)) for p in s.params})
            continue
        (h_in, s_in), (h_out, s_out) = proj.hashes(checkpoint, s, "in"), proj.hashes(checkpoint, s, "out")
        cols = s.d_in - int(s.bias)
        w = block(h_out[:, None] + h_in[None, :cols], (s_out[:, None] * s_in[None, :cols]).reshape(-1))
        assert torch.equal(blocks.setdefault(s.params[0], w), w)  # a shared weight: the same hash in every use
        if s.bias:
            blocks[s.params[1]] = block(h_out + h_in[cols], s_out * s_in[cols])
    return blocks


def _tiny_gpt(tied: bool) -> nn.Module:
    from pipelines.families.chargpt import GPTSpec, build_gpt2

    return build_gpt2(GPTSpec(vocab_size=7, seq_len=5, n_layer=1, n_head=1, n_embd=4, tie_embeddings=tied),
                      seed=0).double()


def _norm_cnn() -> nn.Module:
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 3, 3, padding=1), bn, nn.Tanh(),
                         nn.Conv2d(3, 4, 2, stride=2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                         nn.LayerNorm(16), nn.Linear(16, 6), nn.RMSNorm(6, eps=1e-3), nn.Linear(6, 3)).double().eval()


def _lm_batch(b: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 7, (b, 5), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "loss_mask": torch.tensor([[0, 1, 1, 1, 1]] * b, dtype=torch.float64)}


COVERAGE = {"gpt-tied": (lambda: _tiny_gpt(True), LMTask(), _lm_batch),
            "gpt-untied": (lambda: _tiny_gpt(False), LMTask(), _lm_batch),
            "norm-cnn": (_norm_cnn, ClassificationTask(), lambda: {
                "x": torch.randn(4, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64),
                "y": torch.tensor([0, 2, 1, 0])})}


@pytest.mark.parametrize("case", sorted(COVERAGE))
def test_embeddings_norms_and_a_tied_head_equal_the_explicit_sketch_float64(case: str) -> None:
    """Every parameter sketched exactly once: the tied weight's gradient is the sum of both uses."""
    build, task, make = COVERAGE[case]
    model, batch = build(), make()
    layers = tensorsketch_selection(model)
    proj = TensorSketchProjector(layers, k=16, seed=3)
    named = dict(model.named_parameters())  # one name per tensor: the tied head is transformer.wte.weight
    assert list(proj.sizes) == list(named) and proj.dim == sum(p.numel() for p in named.values())
    assert ("lm_head" in [s.name for s in layers]) == case.startswith("gpt")
    phi = proj.project(capture_layers(model, task, batch, layers), checkpoint=1)
    blocks, conv1d = _explicit_blocks(proj, 1), {s.params[0] for s in layers if s.layout == "conv1d"}
    rows = []
    for b in range(phi.shape[0]):
        one = {key: v[b: b + 1] for key, v in batch.items()}
        grads = torch.autograd.grad(task.output(model, one).sum(), list(named.values()))
        rows.append(torch.cat([(g.T if n in conv1d else g).reshape(-1) for n, g in zip(named, grads)]))
    g = torch.stack(rows)
    ref = g @ torch.cat([blocks[n] for n in named]) * (proj.k / proj.dim) ** 0.5
    torch.testing.assert_close(phi, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(proj.grad_norms(capture_layers(model, task, batch, layers)), g.norm(dim=1),
                               rtol=1e-9, atol=1e-11)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.gain = nn.Linear(5, 3), nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.gain


def test_an_uncovered_parameter_is_refused_unless_left_out_of_the_selection() -> None:
    with pytest.raises(ConfigError, match=r"does not cover 1 trainable.*gain \(_Scaled\).*sparse or dense"):
        tensorsketch_selection(_Scaled())
    with pytest.raises(ConfigError, match=r"does not cover 2 .*0.weight \(Conv2d with groups=2\)"):
        tensorsketch_selection(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)))
    assert [s.name for s in tensorsketch_selection(_Scaled(), ["body"])] == ["body"]
    with pytest.raises(ConfigError, match="names no module"):
        tensorsketch_selection(_Scaled(), ["body.weight"])
    with pytest.raises(ConfigError, match="does not cover"):
        FactoredFeaturizer(_Scaled(), ClassificationTask(), projection="tensorsketch", k=8)
    model = _tiny_gpt(True)
    assert [s.name for s in tensorsketch_selection(model, ["lm_head"])] == ["transformer.wte", "lm_head"]
    fz = FactoredFeaturizer(model, LMTask(), projection="tensorsketch", k=8)
    spec, named = fz.spec(), dict(model.named_parameters())
    assert spec["params"] == list(named) and spec["dim"] == sum(p.numel() for p in named.values())
    assert spec["skipped"] == [] and "transformer.wte" in spec["layers"]
    factored = FactoredFeaturizer(model, LMTask())  # the factored projection still skips them
    assert "transformer.wte.weight" in factored.skipped and "lm_head" not in [s.name for s in factored.layers]


class _Bypass(nn.Module):
    """Uses its second layer's weight outside that layer's forward: hooks never see it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)


@pytest.mark.parametrize("projection", ["tensorsketch", "factored"])
def test_the_first_batch_checks_the_captures_against_autograd(projection: str) -> None:
    """A parameter used outside its module's forward would leave its gradient out of the captured
    features; the first batch compares per-example gradient norms with autograd and refuses."""
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    batches = [(np.arange(4), {"x": x, "y": y})]
    bad = _Bypass()
    fz = FactoredFeaturizer(bad, ClassificationTask(), projection=projection, k=8, k_in=4, k_out=2)
    with pytest.raises(ConfigError, match=r"do not match its gradient.*featurize.projection: sparse"):
        list(fz.featurize(bad.state_dict(), 0, batches))
    good = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    fz = FactoredFeaturizer(good, ClassificationTask(), projection=projection, k=8, k_in=4, k_out=2)
    (ids, feats, q), = fz.featurize(good.state_dict(), 0, batches)
    assert fz.verified and feats.shape == (4, fz.k) and np.isfinite(feats).all()
    fz = FactoredFeaturizer(good, ClassificationTask(), projection=projection, k=8, k_in=4, k_out=2, chunk_size=1)
    list(fz.featurize(good.state_dict(), 0, batches))  # the check reads every chunk of its rows
    assert fz.verified
    if projection == "factored":  # a frozen bias stays covered (the captures hold its gradient too)
        good[0].bias.requires_grad_(False)
        fz = FactoredFeaturizer(good, ClassificationTask(), projection=projection, k_in=4, k_out=2)
        list(fz.featurize(good.state_dict(), 0, batches))
        assert fz.verified and not good[0].bias.requires_grad


def test_auto_picks_fft_for_wide_single_position_layers_and_form_for_small_many_position_ones() -> None:
    proj = TensorSketchProjector([LayerSpec("w", 785, 512, True, "linear")], k=1024)
    assert proj.path(proj.layers[0], 1) == "fft"
    assert proj.path(LayerSpec("c", 28, 16, True, "conv2d"), 1024) == "form"


@pytest.mark.parametrize("k, d_in, d_out, want", [
    (1024, 257, 256, "form"), (1024, 257, 1024, "fft"), (1024, 1025, 256, "fft"),
    (4096, 257, 1024, "form"), (4096, 1025, 256, "form")])
def test_auto_path_of_transformer_layers_follows_the_measured_winner(k, d_in, d_out, want) -> None:
    """128-token sequences, the char LM's layer shapes: the way ``benchmarks/tensorsketch_paths.py``
    measured faster (per batch of 16) is the one the cost model picks."""
    proj = TensorSketchProjector([LayerSpec("w", d_in, d_out, True, "linear")], k=k)
    assert proj.path(proj.layers[0], 128) == want


def _synthetic() -> tuple[list[LayerSpec], list, np.ndarray]:
    """Two layers, 3 positions, two correlated examples; returns layers, captures and the flat (2, d)
    gradients G = sum_t delta_t a_t^T."""
    layers = [LayerSpec("a", 6, 4, False, "linear"), LayerSpec("b", 5, 7, False, "linear")]
    gen, caps, flat = torch.Generator().manual_seed(0), [], []
    for s in layers:
        a = torch.randn(1, 3, s.d_in, generator=gen, dtype=torch.float64)
        d = torch.randn(1, 3, s.d_out, generator=gen, dtype=torch.float64)
        a = torch.cat([a, a + 0.3 * torch.randn(a.shape, generator=gen, dtype=torch.float64)])  # (2, 3, d_in)
        d = torch.cat([d, d + 0.3 * torch.randn(d.shape, generator=gen, dtype=torch.float64)])
        caps.append([(a, d)])
        flat.append((d.transpose(1, 2) @ a).reshape(2, -1))
    return layers, caps, torch.cat(flat, dim=1).numpy()


def test_inner_products_unbiased_with_countsketch_order_variance() -> None:
    layers, caps, g = _synthetic()
    k, seeds = 32, 600
    vals = np.array([[float(phi[0] @ phi[1]), float(phi[0] @ phi[0])] for phi in
                     (TensorSketchProjector(layers, k, seed=s).project(caps, 0) for s in range(seeds))])
    vals *= g.shape[1] / k  # undo E ||phi||^2 = (k/d) ||g||^2
    for col, (u, v) in enumerate(((g[0], g[1]), (g[0], g[0]))):
        true = float(u @ v)
        cs_var = (float(u @ u) * float(v @ v) + true ** 2 - 2 * float((u ** 2) @ (v ** 2))) / k  # CountSketch's
        assert abs(vals[:, col].mean() - true) < 4 * (max(vals[:, col].var(), cs_var) / seeds) ** 0.5
        assert vals[:, col].mean() / true == pytest.approx(1, abs=0.1)
        assert 0.5 * cs_var < vals[:, col].var() < 3 * cs_var  # measured 1.2x over 2,000 seeds


def test_hashes_are_a_pure_function_of_seed_checkpoint_layer_and_side() -> None:
    layers, caps, _ = _synthetic()
    proj = TensorSketchProjector(layers, 64, seed=3)
    first = proj.project(caps, 1)
    proj.clear_cache()
    torch.testing.assert_close(TensorSketchProjector(layers, 64, seed=3).project(caps, 1), first, rtol=0, atol=0)
    assert not torch.allclose(proj.project(caps, 0), first)  # another checkpoint
    assert not torch.allclose(TensorSketchProjector(layers, 64, seed=4).project(caps, 1), first)
    h = proj.hashes(1, layers[0], "in")[0]
    assert not np.array_equal(h, proj.hashes(1, layers[0], "out")[0][: len(h)])
    assert not np.array_equal(h[:4], proj.hashes(1, layers[1], "in")[0][:4])
    code = ("from tda.featurizers.factored import LayerSpec; from tda.projections.tensorsketch import TensorSketchProjector as T; "
            "print(T([LayerSpec('a', 6, 4, False, 'linear')], 64, seed=3).hashes(1, LayerSpec('a', 6, 4, False, "
            "'linear'), 'in')[0].tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(h.tolist())  # another process regenerates them


def test_featurizer_width_spec_and_float32(make_mlp, tiny_data) -> None:
    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(10, in_dim=5, classes=3, seed=3)
    fz = FactoredFeaturizer(model, ClassificationTask(), projection="tensorsketch", k=48, seed=2, chunk_size=4)
    phi, q = fz.featurize_batch({"x": x, "y": y}, np.arange(10), checkpoint=0)
    assert phi.shape == (10, 48) == (10, fz.k) and phi.dtype == np.float32 and fz.feature_dim == 48
    whole = FactoredFeaturizer(model, ClassificationTask(), projection="tensorsketch", k=48, seed=2)
    np.testing.assert_allclose(whole.featurize_batch({"x": x, "y": y}, np.arange(10), 0)[0], phi, rtol=1e-5, atol=1e-6)
    spec = fz.spec()
    assert spec["projection"] == "tensorsketch" and spec["k"] == 48 and spec["layers"] == ["0", "2"]
    assert spec["dim"] == sum(p.numel() for p in model.parameters()) and spec["skipped"] == []
    assert spec != FactoredFeaturizer(model, ClassificationTask()).spec()


def test_bad_input_is_refused() -> None:
    layers, caps, _ = _synthetic()
    for k in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="tensorsketch k must be an integer >= 1"):
            TensorSketchProjector(layers, k)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        TensorSketchProjector(layers, 8, seed=-1)
    with pytest.raises(ConfigError, match="method 'ifft' is unknown"):
        TensorSketchProjector(layers, 8, method="ifft")
    with pytest.raises(ConfigError, match="at least one layer"):
        TensorSketchProjector([], 8)
    proj = TensorSketchProjector(layers, 8)
    with pytest.raises(ShapeError, match="1 captures for 2 layers"):
        proj.project(caps[:1], 0)
    a, d = caps[1][0]
    with pytest.raises(ShapeError, match="captured widths 4, 7 but the projector expects 5, 7"):
        proj.project([caps[0], [(a[..., :4], d)]], 0)
    with pytest.raises(ShapeError, match="captured for 1 examples, the layers before it for 2"):
        proj.project([caps[0], [(a[:1], d[:1])]], 0)
    with pytest.raises(ShapeError, match="no selected layer ran"):
        proj.project([[], []], 0)
    with pytest.raises(ConfigError, match="checkpoint id must be >= 0"):
        proj.project(caps, -1)
    with pytest.raises(ConfigError, match="'kron' of captured layers is unknown"):
        FactoredFeaturizer(_mlp(), ClassificationTask(), projection="kron")


def test_attributor_with_tensorsketch(make_mlp, tiny_data) -> None:
    import datasets

    model = make_mlp(seed=0, in_dim=5, hidden=(7,), out_dim=3)
    x, y = tiny_data(12, in_dim=5, classes=3, seed=5)
    rows = datasets.Dataset.from_dict({"x": x.numpy(), "y": y.numpy()})
    collate = lambda b: {"x": torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in b["x"]])),  # noqa: E731
                         "y": torch.as_tensor(np.asarray(b["y"]))}
    attr = Attributor(model, [model.state_dict()], collate, k=32, seed=3, projection="tensorsketch").fit(rows)
    assert isinstance(attr.featurizer.projector, TensorSketchProjector) and attr.featurizer.k == 32
    scores = attr.scores(rows)
    assert scores.shape == (12, 12) and np.isfinite(scores).all()
    assert np.mean(np.diag(scores) > 0) > 0.8  # self-influence is positive


def test_a_config_run_with_the_tensorsketch_projection(tmp_path, capsys) -> None:
    out, sets = tmp_path / "run", ["featurize.projection=tensorsketch"]
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--quiet",
                 "--set", sets[0]]) == 0
    assert "query id" in capsys.readouterr().out
    store = FeatureStore.open(out / "features-train")
    spec = store.manifest["spec"]
    assert store.k == 64 and spec["projection"] == "tensorsketch" and spec["k"] == 64 and spec["skipped"] == []
    scores = np.load(out / "scores" / "scores.npy")
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    tiny = ROOT / "configs" / "tiny.yaml"
    assert feature_fingerprint(load_config(tiny, sets)) != feature_fingerprint(load_config(tiny))


def test_diffusion_featurizer_takes_tensorsketch() -> None:
    """D-TRAK's draw-averaged features are the mean of the per-draw slots' sketches (linearity)."""
    from pipelines.families.unet import TinyUNet
    from tda.featurizers.diffusion import DiffusionFeaturizer, DiffusionTask, GridDraws, NoiseSchedule

    torch.manual_seed(1)
    model = TinyUNet((4, 8), in_channels=1, time_dim=4, head=2).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task, draws = DiffusionTask(NoiseSchedule(T=50, beta_start=1e-3, beta_end=0.2), "loss"), GridDraws(50, 3, seed=2)
    x, ids = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1, np.array([4, 9])
    out = {}
    for mode in ("mean", "slots"):
        fz = DiffusionFeaturizer(model, task, draws, mode, k=32, projection="tensorsketch")
        ((_, out[mode], _),) = fz.featurize(state, 0, [(ids, {"x": x})])
    assert out["mean"].shape == (2, 32) and out["slots"].shape == (2, 3 * 33)
    slots = out["slots"].reshape(2, 3, 33)
    np.testing.assert_allclose(out["mean"], slots[:, :, :32].mean(axis=1), rtol=1e-4, atol=1e-6)
    assert (slots[:, :, 32] > 0).all() and fz.spec()["projection"] == "tensorsketch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    layers, caps, _ = _synthetic()
    for method in ("fft", "form"):
        proj = TensorSketchProjector(layers, 64, seed=1, method=method)
        cpu = proj.project([[(a.float(), d.float()) for a, d in calls] for calls in caps], 0)
        gpu = proj.project([[(a.float().cuda(), d.float().cuda()) for a, d in calls] for calls in caps], 0)
        assert gpu.is_cuda and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
