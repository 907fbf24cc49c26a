"""The two fitting passes of EK-FAC for one checkpoint (:mod:`tda.scorers.ekfac.factors` has the method).

Pass 1 accumulates the covariances ``A = E[sum_t a_t a_t^T]`` and ``S = E[sum_t delta_t
delta_t^T]`` of every covered layer and eigendecomposes them; pass 2 accumulates the eigenvalue
correction ``Lambda = E[(Q_S^T G_i Q_A)^2]`` in that basis. Both average over the labels the
chosen Fisher draws (:func:`label_draws`). Everything is accumulated in float64.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.errors import ConfigError, NonFiniteError, ShapeError, TDAError
from tda.featurizers.factored import LayerSpec, capture_layers, layer_matrices
from tda.featurizers.gradient import StateDict, featurize_loop
from tda.gradients.per_example import check_finite, eval_mode, loss_weights
from tda.models.tasks import Batch, Task

FISHERS = ("sampled", "expected", "empirical")
#: kronfluence's heuristic damping: 0.1 times the mean of the layer's corrected eigenvalues.
DEFAULT_DAMPING_REL = 0.1
#: Entries of per-example layer gradients formed at once (bounds the memory of pass 2 and of queries).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class LayerFactors:
    """EK-FAC factors of one layer under one checkpoint (float64, CPU).

    Attributes:
        q_a: (d_in, d_in) eigenvectors of the input covariance (columns).
        q_s: (d_out, d_out) eigenvectors of the output-gradient covariance.
        lam: (d_out, d_in) corrected eigenvalues ``E[(Q_S^T G Q_A)^2]``.
        damping: the layer's damping ``lambda_L`` (absolute).
    """

    q_a: Tensor
    q_s: Tensor
    lam: Tensor
    damping: float

    def inverse(self) -> Tensor:
        """``1 / (Lambda + lambda_L)``, (d_out, d_in)."""
        return 1.0 / (self.lam + self.damping)

    def precondition(self, grads: Tensor) -> Tensor:
        """``H_L^-1 G`` for full layer gradients ``grads`` (B, d_out, d_in)."""
        q_a, q_s, inv = (t.to(grads) for t in (self.q_a, self.q_s, self.inverse()))
        rotated = q_s.T @ grads @ q_a  # (B, d_out, d_in)
        return q_s @ (rotated * inv) @ q_a.T


def _label_source(task: Task) -> Callable[[nn.Module, Batch], tuple[Tensor, str]] | None:
    """``(model, batch) -> (logits (B, C), label key)`` for tda's classification tasks."""
    if callable(getattr(task, "_logits", None)) and isinstance(getattr(task, "label_key", None), str):
        return lambda model, batch: (task._logits(model, batch), task.label_key)
    return None


def label_draws(task: Task, model: nn.Module, batch: Batch, ids: Sequence[int], fisher: str, samples: int,
                gen: torch.Generator | None) -> list[tuple[Batch, Tensor | float]]:
    """The labelled batches the Fisher averages over, each with its per-example weight
    (``"sampled"``: ``samples`` draws of weight ``1 / samples``; ``"expected"``: one batch per
    class weighted by its probability; ``"empirical"``: the batch itself).

    Raises:
        ConfigError: labels are to be drawn but the task has none.
        NonFiniteError: the model's logits are NaN or infinite (ids named).
    """
    if fisher == "empirical":
        return [(batch, 1.0)]
    own = getattr(task, "sample_targets", None)
    if fisher == "sampled" and callable(own):
        return [(own(model, batch, gen), 1.0 / samples) for _ in range(samples)]
    source = _label_source(task)
    if source is None:
        raise ConfigError(f"fisher={fisher!r} draws labels from the model, but task {task.name!r} has none to draw; "
                          "use fisher='empirical', or give the task a sample_targets(model, batch, generator) method")
    with eval_mode(model), torch.no_grad():
        logits, key = source(model, batch)
    check_finite(logits, ids, "logits (the labels are drawn from them)")
    probs = torch.softmax(logits.double(), dim=1)  # (B, C)
    dtype = batch[key].dtype
    if fisher == "sampled":
        ys = torch.multinomial(probs.to(gen.device), samples, replacement=True, generator=gen).to(probs.device)
        return [({**batch, key: ys[:, s].to(dtype)}, 1.0 / samples) for s in range(samples)]
    full = torch.ones_like(batch[key])
    return [({**batch, key: full * c}, probs[:, c]) for c in range(probs.shape[1])]


def joined_matrices(layer: LayerSpec, calls: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One layer's captured calls as ``a`` (B, N, d_in) and ``delta`` (B, N, d_out), the calls
    joined as extra positions (the weight gradient is their sum), fp32 (fp64 for fp64 inputs).

    Raises:
        ShapeError: the layer did not run, or its widths differ from ``layer``'s.
    """
    if not calls:
        raise ShapeError(f"layer {layer.name} did not run in the forward pass; leave it out of layers=[...]")
    mats = []
    for inp, grad in calls:
        dtype = torch.float64 if inp.dtype == torch.float64 else torch.float32
        mats.append(layer_matrices(layer, inp.to(dtype), grad.to(dtype)))
    a, delta = torch.cat([m[0] for m in mats], dim=1), torch.cat([m[1] for m in mats], dim=1)
    if a.shape[-1] != layer.d_in or delta.shape[-1] != layer.d_out:
        raise ShapeError(f"layer {layer.name}: captured widths {a.shape[-1]}, {delta.shape[-1]} but the factors "
                         f"expect {layer.d_in}, {layer.d_out}; fit the factors on this architecture")
    return a, delta


def _loss_matrices(model: nn.Module, task: Task, batch: Batch, layers: Sequence[LayerSpec], ids: Sequence[int]
                   ) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``a`` (B, N, d_in) and loss gradients ``Q delta`` (B, N, d_out), the layer's
    calls joined as extra positions, fp32 (fp64 for fp64 models); checked finite."""
    caps = capture_layers(model, task, batch, layers)
    q = loss_weights(model, task, batch)
    check_finite(q, ids, "loss weights Q")
    out = []
    for layer, calls in zip(layers, caps):
        a, delta = joined_matrices(layer, calls)
        delta = delta * q.to(a)[:, None, None]
        check_finite(a, ids, f"inputs of layer {layer.name}")
        check_finite(delta, ids, f"output gradients of layer {layer.name}")
        out.append((a, delta))
    return out


def projector_of(layers: Sequence[LayerSpec], settings: EKFACSettings):
    """The factored projector of projected-space factors (``None`` for full-space ones)."""
    if settings.projection is None:
        return None
    from tda.featurizers.factored import FactoredProjector  # tda.featurizers.factored imports tda.featurizers.gradient, as this module does

    p = settings.projection
    return FactoredProjector(list(layers), p["k_in"], p["k_out"], p["seed"], p["kind"])


def factor_width(projector, layer: LayerSpec, side: str) -> int:
    """Width of a layer's input (``side="in"``) or output-gradient factor, projected or not."""
    if projector is None:
        return layer.d_in if side == "in" else layer.d_out
    return projector.width(layer, side)


def project_matrices(projector, checkpoint: int, layer: LayerSpec, a: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``(a P_in, delta P_out)``: a layer's inputs and output gradients in the projected space
    (an identity side unchanged), so ``(delta P_out)^T (a P_in) = P_out^T G P_in``."""
    p_in, p_out = (projector.factor(checkpoint, layer, side) for side in ("in", "out"))
    return (a if p_in is None else a @ p_in.to(a)), (delta if p_out is None else delta @ p_out.to(delta))


def _weighted(x: Tensor, w: Tensor | float) -> Tensor:
    return x * w if isinstance(w, float) else x * w.to(x)[:, None, None]


def _lambda_update(ra: Tensor, rd: Tensor, w: Tensor | float) -> Tensor:
    """``sum_b w_b (sum_t rd_bt ra_bt^T)^2`` for rotated inputs (B, N, d_in) and gradients (B, N, d_out)."""
    if ra.shape[1] == 1:  # (Q_S^T delta)(Q_A^T a)^T: square the vectors, one matmul over the batch
        return (_weighted(rd.pow(2), w)[:, 0].T @ ra[:, 0].pow(2)).double()
    total = torch.zeros(rd.shape[2], ra.shape[2], dtype=torch.float64, device=ra.device)
    step = max(1, CHUNK_ELEMENTS // (rd.shape[2] * ra.shape[2]))
    for lo in range(0, ra.shape[0], step):
        per = rd[lo: lo + step].transpose(1, 2) @ ra[lo: lo + step]  # (b, d_out, d_in) = Q_S^T G Q_A
        wb = w if isinstance(w, float) else w[lo: lo + step]
        total += _weighted(per.pow(2), wb).sum(dim=0).double()
    return total


def weights_digest(model: nn.Module, layers: Sequence[LayerSpec]) -> str:
    """Digest of the covered weights (what a checkpoint's factors were fitted under)."""
    h = hashlib.blake2b(digest_size=16)
    params = dict(model.named_parameters())
    for name in (p for s in layers for p in s.params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EKFACSettings:
    """What determines the factors besides the data and weights (recorded, compared on load)."""

    fisher: str = "sampled"
    samples: int = 1
    seed: int = 0
    damping: float | None = None
    damping_rel: float = DEFAULT_DAMPING_REL
    #: fitted in the factored projection's space (LoGra): ``{"k_in", "k_out", "seed", "kind"}``
    #: of the :class:`~tda.featurizers.factored.FactoredProjector` applied to inputs and output gradients
    #: before the covariances; ``None``: the full layer space
    projection: dict | None = None

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise ConfigError(f"fisher {self.fisher!r} is unknown; use one of {FISHERS}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"samples (label draws per example) must be an integer >= 1, got {self.samples!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for label, value in (("damping", self.damping), ("damping_rel", self.damping_rel)):
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{label} must be a positive finite number, got {value}; the default is "
                                  f"damping=None with damping_rel={DEFAULT_DAMPING_REL} (kronfluence's heuristic)")


class Fitter:
    """The two passes over the training data for one checkpoint (model already loaded)."""

    def __init__(self, model: nn.Module, task: Task, layers: Sequence[LayerSpec], settings: EKFACSettings,
                 checkpoint: int, device: torch.device) -> None:
        self.model, self.task, self.layers, self.settings, self.device = model, task, list(layers), settings, device
        self.checkpoint, self.projector = checkpoint, projector_of(layers, settings)
        self.gen: torch.Generator | None = None
        if settings.fisher == "sampled":
            seq = np.random.SeedSequence([settings.seed, checkpoint])
            gen_device = device if device.type == "cuda" else torch.device("cpu")
            self.gen = torch.Generator(device=gen_device).manual_seed(int(seq.generate_state(1)[0]))
        w_in, w_out = ([factor_width(self.projector, s, side) for s in layers] for side in ("in", "out"))
        self.cov_a = [torch.zeros(w, w, dtype=torch.float64, device=device) for w in w_in]
        self.cov_s = [torch.zeros(w, w, dtype=torch.float64, device=device) for w in w_out]
        self.lam = [torch.zeros(o, i, dtype=torch.float64, device=device) for o, i in zip(w_out, w_in)]
        self.bases: list[tuple[Tensor, Tensor]] = []
        self.n = 0

    def _batches(self, batch: Batch, ids: Sequence[int]):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        draws = label_draws(self.task, self.model, batch, ids, self.settings.fisher, self.settings.samples, self.gen)
        for j, (b, w) in enumerate(draws):
            mats = _loss_matrices(self.model, self.task, b, self.layers, ids)
            if self.projector is not None:
                mats = [project_matrices(self.projector, self.checkpoint, s, a, d) for s, (a, d) in zip(self.layers, mats)]
            yield j, mats, w

    def covariance_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        for j, mats, w in self._batches(batch, ids):
            for i, (a, delta) in enumerate(mats):
                if j == 0:  # inputs do not depend on the labels
                    flat = a.reshape(-1, a.shape[-1])
                    self.cov_a[i] += (flat.T @ flat).double()
                flat_d = delta.reshape(-1, delta.shape[-1])
                self.cov_s[i] += (_weighted(delta, w).reshape(-1, delta.shape[-1]).T @ flat_d).double()
        self.n += len(ids)
        return np.empty((len(ids), 0), np.float32), np.empty(len(ids), np.float32)

    def eigen(self) -> None:
        for s, a, g in zip(self.layers, self.cov_a, self.cov_s):
            if not (torch.isfinite(a).all() and torch.isfinite(g).all()):
                raise NonFiniteError(f"covariances of layer {s.name} are not finite; check the data and checkpoint")
            self.bases.append((torch.linalg.eigh(a / self.n)[1], torch.linalg.eigh(g / self.n)[1]))

    def lambda_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        for _, mats, w in self._batches(batch, ids):
            for i, (a, delta) in enumerate(mats):
                q_a, q_s = self.bases[i]
                self.lam[i] += _lambda_update(a @ q_a.to(a), delta @ q_s.to(a), w)
        return np.empty((len(ids), 0), np.float32), np.empty(len(ids), np.float32)

    def factors(self) -> list[LayerFactors]:
        out = []
        for s, lam, (q_a, q_s) in zip(self.layers, self.lam, self.bases):
            lam = lam / self.n
            damping = self.settings.damping or self.settings.damping_rel * float(lam.mean())
            if not damping > 0:
                raise TDAError(f"layer {s.name}: no training example has a gradient through it (its eigenvalue "
                               "correction is all zero); leave it out with layers=[...] or pass an absolute damping")
            out.append(LayerFactors(q_a.cpu(), q_s.cpu(), lam.cpu(), float(damping)))
        return out


def fit_checkpoint(model: nn.Module, task: Task, layers: Sequence[LayerSpec], settings: EKFACSettings,
                   checkpoint: int, state: StateDict | str | Path, batches: Iterable[tuple[np.ndarray, Batch]],
                   again: Iterable[tuple[np.ndarray, Batch]], device: torch.device) -> tuple[list[LayerFactors], int]:
    """Load checkpoint ``state`` and run both passes (``batches`` for the covariances, ``again``,
    the same batches afresh, for the correction); returns the layers' factors and n."""
    fitter = Fitter(model, task, layers, settings, checkpoint, device)
    for _ in featurize_loop(model, device, fitter.covariance_batch, state, checkpoint, batches, lambda: None):
        pass
    if fitter.n == 0:
        raise TDAError("cannot fit EK-FAC on an empty training set")
    fitter.eigen()
    for _ in featurize_loop(model, device, fitter.lambda_batch, state, checkpoint, again, lambda: None):
        pass
    return fitter.factors(), fitter.n


__all__ = ["CHUNK_ELEMENTS", "DEFAULT_DAMPING_REL", "EKFACSettings", "FISHERS", "Fitter", "LayerFactors",
           "factor_width", "fit_checkpoint", "joined_matrices", "label_draws", "project_matrices", "projector_of",
           "weights_digest"]
