"""Approximate unlearning of the forget set without retraining (``unlearn.approximate``), compared with
the retrained models of the exact check: the run's first model updated by gradient difference,
unrestricted and restricted to the weights most attributed to the forget loss (WAGLE-like,
:mod:`tda.unlearning`). The ascent stops for each forget example once its loss reaches the original
model's mean loss on the held-out queries. Per variant: forget-set accuracy and loss, retain and
query accuracy, the distance of the query margins to the retrained models' (in units of their spread over seeds, a
KLOM-like figure: 0 is as good as retraining), and a loss-attack membership-inference AUC of the
forget set against the held-out queries (0.5: indistinguishable from never trained on).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tda.featurize import load_checkpoint
from tda.tasks import classification_margin
from tda.unlearning import gradient_difference, membership_auc, weight_mask

from .families.base import collated
from .layout import RunPaths, load_checkpoint_list
from .schema import RunConfig


def _ce_each(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def _ce(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return _ce_each(model, batch).mean()


def _metrics(model: torch.nn.Module, forget: dict, retain: dict, query: dict,
             retrained: np.ndarray | None) -> dict[str, Any]:
    with torch.no_grad():
        out = {}
        for name, b in (("forget", forget), ("retain", retain), ("query", query)):
            logits = model(b["x"])
            out[f"{name}_accuracy"] = float((logits.argmax(1) == b["y"]).double().mean())
            out[f"{name}_loss"] = float(F.cross_entropy(logits, b["y"]))
        lf = F.cross_entropy(model(forget["x"]), forget["y"], reduction="none").numpy()
        lq = F.cross_entropy(model(query["x"]), query["y"], reduction="none").numpy()
        out["membership_auc"] = membership_auc(lf, lq)
        if retrained is not None:
            margins = classification_margin(model(query["x"]), query["y"]).double().numpy()
            spread = max(float(retrained.std(axis=0, ddof=1).mean()), 1e-12) if len(retrained) > 1 else 1.0
            out["margin_distance_to_retrained"] = float(np.abs(margins - retrained.mean(axis=0)).mean() / spread)
    return out


def approximate_unlearning(cfg: RunConfig, family: Any, paths: RunPaths, forget_rows: np.ndarray,
                           retrained_margins: np.ndarray | None) -> dict[str, Any]:
    """The original model, gradient difference, and masked gradient difference, with their metrics."""
    u = cfg.unlearn
    data = family.datasets(cfg, paths)
    train, query = collated(data["train"], family.collate(cfg)), collated(data["query"], family.collate(cfg))
    rest = np.setdiff1d(np.arange(len(train["y"])), forget_rows)
    sample = np.random.default_rng([u.seed, 9001]).choice(rest, size=min(len(rest), 1024), replace=False)
    forget = {k: v[forget_rows] for k, v in train.items()}
    retain_sample = {k: v[sample] for k, v in train.items()}
    retain_all = {k: v[rest] for k, v in train.items()}
    last = [e for e in load_checkpoint_list(paths) if e.get("model", 0) == 0][-1]
    base = family.build_model(cfg)
    base.load_state_dict(load_checkpoint(paths.checkpoint_file(last)))
    base.eval()
    lr = u.approx_lr if u.approx_lr is not None else cfg.train.lr
    res = {"model": "the run's model 0, last attributed checkpoint", "steps": u.approx_steps, "lr": lr,
           "mask_fraction": u.mask_fraction, "retain_sample": len(sample), "variants": {}}
    res["variants"]["original"] = _metrics(base, forget, retain_all, query, retrained_margins)
    bound = res["forget_bound"] = res["variants"]["original"]["query_loss"]  # a held-out example's loss
    torch.manual_seed(u.seed)
    for name, masked in (("gradient difference", False), ("masked gradient difference", True)):
        model = copy.deepcopy(base)
        mask = weight_mask(model, _ce, forget, retain_sample, u.mask_fraction) if masked else None
        gradient_difference(model, _ce, forget, retain_sample, u.approx_steps, lr, mask=mask, forget_bound=bound,
                            example_loss=_ce_each)
        res["variants"][name] = _metrics(model, forget, retain_all, query, retrained_margins)
    return res


__all__ = ["approximate_unlearning"]
