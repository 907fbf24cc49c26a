"""The demo UNet of the ``diffusion`` family, its training recipe and its sampler (moved from
``tda/featurizers/diffusion.py``; the noise schedule, output functions, draws and featurizer stay in
:mod:`tda.featurizers.diffusion`).

:class:`TinyUNet` (with :class:`ResBlock` and :func:`timestep_embedding`) predicts the noise
``eps_theta(x_t, t)`` of 28x28 images; :func:`train_ddpm` trains an epsilon-prediction model on
``L_simple`` recording every ``(t, noise seed)`` draw in a :class:`tda.featurizers.diffusion.TrainLog`, and
:func:`sample_ddpm` draws images by ancestral DDPM sampling.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tda.featurizers.diffusion import _SEED_MAX, NoiseSchedule, TrainLog, noise_from_seeds, noisy
from tda.errors import ConfigError, DataError, NonFiniteError

OPTIMIZERS = ("adam", "sgd")  # train_ddpm's optimizers (model.options.optimizer)


# ------------------------------------------------------------------ model
def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding added in between, 1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class TinyUNet(nn.Module):
    """A small UNet predicting the noise ``eps_theta(x_t, t)`` of (B, C, H, W) images.

    The image is first folded 2x2 into channels (pixel unshuffle: 28x28x1 -> 14x14x4), then
    one residual block per level with a stride-2 convolution between levels, the mirror path
    with skip connections and nearest upsampling; the fold is undone into ``head`` channels
    and two full-resolution convolutions (seeing ``x_t`` again) give the prediction. Working
    at half resolution makes it cheap on a CPU. GroupNorm only (per example): vmap-safe for
    per-example gradients.

    Args:
        channels: widths per level, e.g. (32, 64): 14x14 then 7x7 for MNIST.
        in_channels: image channels.
        time_dim: sinusoidal embedding size (the MLP on it doubles it).
        head: channels of the full-resolution head.
    """

    def __init__(self, channels: Sequence[int] = (32, 64), in_channels: int = 1, time_dim: int = 32,
                 head: int = 8) -> None:
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ConfigError(f"UNet channels must be positive widths, got {list(channels)}")
        chans = [int(c) for c in channels]
        tdim = 2 * time_dim
        self.time_dim = time_dim
        self.temb = nn.Sequential(nn.Linear(time_dim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inc = nn.Conv2d(4 * in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(c_in, c, tdim) for c_in, c in zip([chans[0]] + chans[:-1], chans))
        self.pool = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in chans[:-1])
        self.mid = ResBlock(chans[-1], chans[-1], tdim)
        self.up = nn.ModuleList(ResBlock(c + c_out, c_out, tdim) for c, c_out in
                                zip(chans[::-1], chans[::-1]))
        self.shrink = nn.ModuleList(nn.Conv2d(c, c_low, 1) for c, c_low in zip(chans[:0:-1], chans[-2::-1]))
        self.out = nn.Sequential(nn.GroupNorm(min(8, chans[0]), chans[0]), nn.SiLU(),
                                 nn.Conv2d(chans[0], 4 * head, 3, padding=1))
        self.head = nn.Sequential(nn.Conv2d(head + in_channels, head, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(head, in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Shapes: x (B, C, H, W) with H, W divisible by 2**len(channels); t (B,) -> (B, C, H, W)."""
        temb = self.temb(timestep_embedding(t, self.time_dim).to(x.dtype))  # (B, 2 time_dim)
        h = self.inc(F.pixel_unshuffle(x, 2))  # (B, c0, H/2, W/2)
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, temb)
            skips.append(h)
            if level < len(self.pool):
                h = self.pool[level](h)  # halve the resolution
        h = self.mid(h, temb)
        for level, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if level < len(self.shrink):
                h = F.interpolate(self.shrink[level](h), scale_factor=2.0, mode="nearest")
        h = F.pixel_shuffle(self.out(h), 2)  # (B, head, H, W)
        return self.head(torch.cat([h, x], dim=1))  # full-resolution convolutions: no 2x2 grid


# ------------------------------------------------------------------ training and sampling
def train_ddpm(
    make_model: Callable[[], nn.Module],
    x: Tensor,
    ids: np.ndarray,
    schedule: NoiseSchedule,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    warmup_steps: int = 50,
    on_epoch: Callable[..., None] | None = None,
    weights: Tensor | None = None,
    optimizer: str = "adam",
) -> tuple[nn.Module, TrainLog]:
    """Train an epsilon-prediction model with Adam (or plain SGD) on ``L_simple``, recording every draw.

    Deterministic given ``seed``: initialisation after ``torch.manual_seed(seed)``, batch order,
    timesteps and noise seeds from one seeded ``torch.Generator``; noise from the recorded seeds
    (:func:`noise_from_seeds`). The learning rate warms up linearly over ``warmup_steps`` and
    decays linearly to 0.

    Args:
        make_model: builds a fresh model called as ``model(x_t, t)``.
        x: (n, C, H, W) images scaled to [-1, 1]. ids: (n,) example ids.
        on_epoch: called as ``on_epoch(epoch, model, lr=mean learning rate of the epoch)``.
        weights: optional (n,) per-example data weights: the batch loss is the batch mean of
            ``w_i * L_simple_i``, and batches, timesteps and noise are those of the unweighted
            run (zero weights drop examples without reshuffling: the small-drop protocol).
        optimizer: ``"adam"`` or ``"sgd"`` (no momentum: each step is ``-lr`` times the clipped
            batch gradient, the step TracIn-style scorers assume).

    Returns:
        The trained model (eval mode) and the :class:`TrainLog` of every (step, example).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(x) == 0 or len(x) != len(ids):
        raise DataError(f"DDPM training needs equal, non-zero numbers of images and ids, got {len(x)}, {len(ids)}")
    if weights is not None and tuple(weights.shape) != (len(x),):
        raise DataError(f"DDPM data weights must be ({len(x)},), got {tuple(weights.shape)}")
    torch.manual_seed(seed)
    model = make_model()
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"DDPM optimizer {optimizer!r} is unknown; use one of {OPTIMIZERS}")
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)) * max(0.0, 1.0 - s / total))
    gen = torch.Generator().manual_seed(seed)
    alpha_bar = schedule.alpha_bar.float()
    log: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "epoch", "example_id", "timestep", "noise_seed")}
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        lrs = []
        for lo in range(0, len(x), batch_size):
            idx = order[lo: lo + batch_size]
            t = torch.randint(0, schedule.T, (len(idx),), generator=gen)
            seeds = torch.randint(0, _SEED_MAX, (len(idx),), generator=gen).numpy()
            noise = noise_from_seeds(seeds, x.shape[1:])
            loss = _batch_loss(model(noisy(x[idx], t, noise, alpha_bar), t), noise,
                               None if weights is None else weights[idx])
            if not torch.isfinite(loss):
                raise NonFiniteError(f"DDPM loss became {loss.item()} at step {step}; lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            for key, val in (("step", np.full(len(idx), step)), ("epoch", np.full(len(idx), epoch)),
                             ("example_id", ids[idx.numpy()]), ("timestep", t.numpy()), ("noise_seed", seeds)):
                log[key].append(np.asarray(val, dtype=np.int64))
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, model, lr=float(np.mean(lrs)))
    return model.eval(), TrainLog(**{k: np.concatenate(v) for k, v in log.items()})


def _batch_loss(eps_pred: Tensor, noise: Tensor, weights: Tensor | None) -> Tensor:
    """``L_simple`` of a batch: the plain MSE, or the batch mean of weighted per-example MSEs."""
    if weights is None:
        return F.mse_loss(eps_pred, noise)
    per_example = (eps_pred - noise).pow(2).flatten(1).mean(dim=1)
    return (weights.to(per_example.dtype) * per_example).mean()


@torch.no_grad()
def sample_ddpm(model: nn.Module, schedule: NoiseSchedule, n: int, shape: Sequence[int] = (1, 28, 28),
                seed: int = 0) -> Tensor:
    """Ancestral DDPM sampling with the clipped ``x_0`` prediction (Ho et al.'s
    ``clip_denoised``): ``x0 = clamp((z - sqrt(1 - ab_t) eps) / sqrt(ab_t))``, then the posterior
    mean of ``q(x_{t-1} | x_t, x0)`` plus ``sigma_t = sqrt(beta_t (1 - ab_{t-1}) / (1 - ab_t))``
    noise. Returns (n, *shape) images in [-1, 1]."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    betas, ab = schedule.betas, schedule.alpha_bar  # float64
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    coef_x0 = (betas * ab_prev.sqrt() / (1.0 - ab)).float()
    coef_z = ((1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab)).float()
    sigma = (betas * (1.0 - ab_prev) / (1.0 - ab)).sqrt().float()
    z = torch.randn(n, *shape, generator=gen)
    for t in reversed(range(schedule.T)):
        eps = model(z, torch.full((n,), t, dtype=torch.long))
        x0 = ((z - (1.0 - ab[t]).sqrt().float() * eps) / ab[t].sqrt().float()).clamp(-1.0, 1.0)
        z = coef_x0[t] * x0 + coef_z[t] * z
        if t > 0:
            z = z + sigma[t] * torch.randn(z.shape, generator=gen)
    return z.clamp(-1.0, 1.0)
