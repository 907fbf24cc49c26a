"""Approximate unlearning without retraining: gradient difference, optionally restricted by a
weight-attribution mask (the WAGLE idea), and the membership-inference check.

Gradient difference takes ``steps`` of SGD on ``-loss(forget) + retain_weight * loss(retain)``
(ascent on the forget set, descent on a retain sample). The mask keeps the ``fraction`` of weights
most attributed to the forget loss relative to the retain loss, ``|w * dL_f/dw| / (|w * dL_r/dw| + eps)``
(first-order effect of zeroing the weight on each loss), and only those weights move.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from tda.errors import TDAError

Loss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _grads(model: nn.Module, loss_fn: Loss, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def weight_mask(model: nn.Module, loss_fn: Loss, forget: dict[str, torch.Tensor], retain: dict[str, torch.Tensor],
                fraction: float) -> dict[str, torch.Tensor]:
    """Boolean mask per parameter: the top ``fraction`` of all weights by forget-over-retain attribution."""
    if not 0 < fraction <= 1:
        raise TDAError(f"mask fraction must be in (0, 1], got {fraction}")
    gf, gr = _grads(model, loss_fn, forget), _grads(model, loss_fn, retain)
    params = dict(model.named_parameters())
    ratio = {n: (params[n].detach() * gf[n]).abs() / ((params[n].detach() * gr[n]).abs() + 1e-12) for n in params}
    flat = torch.cat([r.reshape(-1) for r in ratio.values()])
    keep = max(1, int(round(fraction * flat.numel())))
    threshold = torch.topk(flat, keep).values.min()
    return {n: r >= threshold for n, r in ratio.items()}


def gradient_difference(model: nn.Module, loss_fn: Loss, forget: dict[str, torch.Tensor],
                        retain: dict[str, torch.Tensor], steps: int, lr: float, retain_weight: float = 1.0,
                        mask: dict[str, torch.Tensor] | None = None, forget_bound: float | None = None,
                        example_loss: Callable | None = None) -> nn.Module:
    """``model`` updated in place by ``steps`` full-batch SGD steps of gradient difference (masked
    weights only, when a mask is given); returns it.

    Ascent on a cross-entropy is unbounded: with ``forget_bound`` (and ``example_loss``, per-example
    losses ``(model, batch) -> (b,)``), each forget example's loss is clamped at the bound, so the
    ascent stops once an example is as badly fitted as a held-out one (its gradient is then 0).
    """
    model.train()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if forget_bound is not None and example_loss is not None:
            forget_loss = example_loss(model, forget).clamp(max=forget_bound).mean()
        else:
            forget_loss = loss_fn(model, forget)
        loss = -forget_loss + retain_weight * loss_fn(model, retain)
        if not torch.isfinite(loss):
            raise TDAError("gradient-difference unlearning diverged (non-finite loss); lower unlearn.approx_lr "
                           "or unlearn.approx_steps")
        loss.backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    p -= lr * (p.grad * mask[name] if mask is not None else p.grad)
    model.eval()
    return model


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC-AUC of the loss attack (lower loss: guessed a member) on members against non-members;
    0.5 is what a model never trained on the members gives."""
    from tda.workflows.curation import roc_auc

    scores = -np.concatenate([member_losses, nonmember_losses])
    positive = np.r_[np.ones(len(member_losses), bool), np.zeros(len(nonmember_losses), bool)]
    return roc_auc(scores, positive)


__all__ = ["gradient_difference", "membership_auc", "weight_mask"]
