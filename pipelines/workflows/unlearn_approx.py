"""Approximate unlearning of the forget set without retraining (``unlearn.approximate``), compared with
the retrained models of the exact check: the run's first model updated by gradient difference,
unrestricted and restricted to the weights most attributed to the forget loss (WAGLE-like,
:mod:`tda.workflows.unlearning`). The ascent stops for each forget example once its loss reaches the original
model's mean loss on the held-out queries. Per variant: forget-set accuracy and loss, retain and
query accuracy (classifiers), the distance of the queries' attributed outputs (margins; an LM's
completion log-probabilities) to the retrained models' (in units of their spread over seeds, a
KLOM-like figure: 0 is as good as retraining), and a loss-attack membership-inference AUC of the
forget set against the held-out queries (0.5: indistinguishable from never trained on). An LM's
loss is the mean next-token loss of a sequence (a query's: of its completion).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from tda.featurizers.gradient import apply_checkpoint, load_checkpoint
from tda.workflows.unlearning import gradient_difference, membership_auc, weight_mask

from pipelines.families.base import collated
from pipelines.layout import RunPaths, load_checkpoint_list
from pipelines.spec.schema import RunConfig


class _Ops:
    """Per-example loss, attributed output and (classifiers) top-1 hits, from the family's task
    (:meth:`tda.models.tasks.Task.example_loss`, :meth:`tda.models.tasks.Task.logits`)."""

    def __init__(self, cfg: RunConfig, family: Any) -> None:
        self.task = family.task(cfg)
        self.classifier = self.task.kind == "classification"

    def loss_each(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.example_loss(model, batch)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_each(model, batch).mean()

    def output(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The attributed output (margin, completion log-probability): what the retrained models measured."""
        return self.task.output(model, batch)

    def hits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
        return float((self.task.logits(model, batch).argmax(1) == batch[self.task.label_key]).double().mean())


def _metrics(ops: _Ops, model: torch.nn.Module, forget: dict, retain: dict, query: dict,
             retrained: np.ndarray | None) -> dict[str, Any]:
    with torch.no_grad():
        out, losses = {}, {}
        for name, b in (("forget", forget), ("retain", retain), ("query", query)):
            if ops.classifier:
                out[f"{name}_accuracy"] = ops.hits(model, b)
            losses[name] = ops.loss_each(model, b).double().numpy()
            out[f"{name}_loss"] = float(losses[name].mean())
        out["membership_auc"] = membership_auc(losses["forget"], losses["query"])
        if retrained is not None:
            outputs = ops.output(model, query).double().numpy()
            spread = max(float(retrained.std(axis=0, ddof=1).mean()), 1e-12) if len(retrained) > 1 else 1.0
            out["output_distance_to_retrained"] = float(np.abs(outputs - retrained.mean(axis=0)).mean() / spread)
    return out


def training_lr(cfg: RunConfig) -> float:
    """The learning rate the attributed model trained with: the recorded recipe's for checkpoints
    trained elsewhere (``model.checkpoints``), else ``train.lr``."""
    if cfg.model.checkpoints:
        from pipelines.families.capabilities import resolve_recipe

        return resolve_recipe(cfg)[0].lr
    return cfg.train.lr


def approximate_unlearning(cfg: RunConfig, family: Any, paths: RunPaths, forget_rows: np.ndarray,
                           retrained_margins: np.ndarray | None) -> dict[str, Any]:
    """The original model, gradient difference, and masked gradient difference, with their metrics."""
    u = cfg.unlearn
    data = family.datasets(cfg, paths)
    train, query = collated(data["train"], family.collate(cfg)), collated(data["query"], family.collate(cfg))
    ops = _Ops(cfg, family)
    rest = np.setdiff1d(np.arange(len(next(iter(train.values())))), forget_rows)
    sample = np.random.default_rng([u.seed, 9001]).choice(rest, size=min(len(rest), 1024), replace=False)
    forget = {k: v[forget_rows] for k, v in train.items()}
    retain_sample = {k: v[sample] for k, v in train.items()}
    retain_all = {k: v[rest] for k, v in train.items()}
    entries = load_checkpoint_list(paths)  # the last checkpoint of the first training run
    last = [e for e in entries if e.get("recorded_model", e.get("model", 0)) == entries[0].get("recorded_model", 0)][-1]
    base = family.build_model(cfg)
    apply_checkpoint(base, load_checkpoint(paths.checkpoint_file(last)), f"checkpoint {last['file']}")
    base.eval()
    lr = u.approx_lr if u.approx_lr is not None else training_lr(cfg)
    res = {"model": "the run's model 0, last attributed checkpoint", "steps": u.approx_steps, "lr": lr,
           "mask_fraction": u.mask_fraction, "retain_sample": len(sample), "variants": {}}
    res["variants"]["original"] = _metrics(ops, base, forget, retain_all, query, retrained_margins)
    bound = res["forget_bound"] = res["variants"]["original"]["query_loss"]  # a held-out example's loss
    torch.manual_seed(u.seed)
    for name, masked in (("gradient difference", False), ("masked gradient difference", True)):
        model = copy.deepcopy(base)
        mask = weight_mask(model, ops.loss, forget, retain_sample, u.mask_fraction) if masked else None
        gradient_difference(model, ops.loss, forget, retain_sample, u.approx_steps, lr, mask=mask, forget_bound=bound,
                            example_loss=ops.loss_each)
        res["variants"][name] = _metrics(ops, model, forget, retain_all, query, retrained_margins)
    return res


__all__ = ["approximate_unlearning"]
