"""Per-example predictions of any model, from its task's kind (docs/methods.md section 1).

What a person reads next to an attribution (the predicted class and its probability) and what
curation ranks by (the training loss and ``1 - p(label)``) follow from the task, not from the
model family: a classification task (``Task.kind == "classification"``) gives class scores
through :meth:`tda.models.tasks.Task.logits`; a causal-LM task gives each sequence's mean next-token loss
through :meth:`tda.models.tasks.Task.example_loss`. :func:`example_predictions` averages them over
checkpoints; :func:`checkpoint_quality` measures one checkpoint on a sample (the input check
before featurizing).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.data.loading import example_ids, iter_batches
from tda.errors import DataError, ShapeError
from tda.featurizers.gradient import apply_checkpoint, load_checkpoint
from tda.models.tasks import Task

Collate = Callable[[Mapping[str, Any]], dict[str, Tensor]]
PREDICTED_KINDS = ("classification", "causal-lm")


def _check_kind(task: Task) -> None:
    if task.kind not in PREDICTED_KINDS:
        raise ShapeError(f"per-example predictions need a classification or causal-LM task; {type(task).__name__} "
                         f"is of kind {task.kind!r} (set Task.kind and implement logits or example_loss)")


def _check_labels(y: Tensor, classes: int) -> None:
    bad = y[(y < 0) | (y >= classes)]
    if len(bad):
        raise DataError(f"{len(bad)} label(s) lie outside the model's {classes} classes (index {int(bad[0])} is out of "
                        f"bounds, e.g. {bad[:5].tolist()}): a label >= the number of classes; fix the labels (or "
                        "data.label_column), or build the model with more outputs")


@torch.no_grad()
def batch_predictions(model: nn.Module, task: Task, batches: Iterable[dict[str, Tensor]]) -> dict[str, np.ndarray]:
    """One model over ``batches``: ``probs`` (n, C) and ``labels`` (n,) for classification, and
    the training ``loss`` (n,) of every example (float64)."""
    _check_kind(task)
    model.eval()
    probs, labels, losses = [], [], []
    for batch in batches:
        if task.kind == "classification":
            logits = task.logits(model, batch).double()
            y = batch[task.label_key].long()
            _check_labels(y, logits.shape[1])
            probs.append(torch.softmax(logits, dim=1))
            labels.append(y)
            losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="none"))
        else:
            losses.append(task.example_loss(model, batch).double())
    out = {"loss": torch.cat(losses).numpy()}
    if probs:
        out.update(probs=torch.cat(probs).numpy(), labels=torch.cat(labels).numpy())
    return out


def example_predictions(model: nn.Module, checkpoints: Sequence[Any], dataset: Any, collate: Collate, task: Task,
                        batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per example of ``dataset``, over every checkpoint (state dicts or files).

    Returns:
        ``ids``; ``loss`` (mean over checkpoints of the training loss); ``confidence``
        (classification: mean ``1 - p(label)``; LM: ``1 - exp(-loss)``); ``labels``, ``predicted``
        (the top class of the mean probabilities) and ``p_predicted`` (its probability) --
        for an LM ``-1``, ``-1`` and ``exp(-loss)`` (the geometric mean next-token probability);
        ``probs`` (n, C) for classification.
    """
    runs = []
    for ckpt in checkpoints:
        apply_checkpoint(model, load_checkpoint(ckpt), f"checkpoint {ckpt if isinstance(ckpt, (str, bytes)) else ''}")
        runs.append(batch_predictions(model, task, (b for _, b in iter_batches(dataset, collate, batch_size))))
    loss = np.mean([r["loss"] for r in runs], axis=0)
    out: dict[str, np.ndarray] = {"ids": np.asarray(example_ids(dataset)), "loss": loss}
    if task.kind == "classification":
        p = np.stack([r["probs"] for r in runs])  # (M, n, C)
        y = runs[0]["labels"]
        p_label = p[:, np.arange(len(y)), y]  # (M, n)
        mean = p.mean(0)
        out.update(labels=y, predicted=mean.argmax(1), p_predicted=mean.max(1), confidence=(1 - p_label).mean(0),
                   probs=mean)
    else:
        none = np.full(len(loss), -1, dtype=np.int64)
        out.update(labels=none, predicted=none, p_predicted=np.exp(-loss), confidence=1 - np.exp(-loss))
    return out


def checkpoint_quality(model: nn.Module, task: Task, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """``loss`` (mean training loss), ``chance_loss`` (a uniform guess's: log C, or log V for an
    LM when the model's vocabulary is known) and, for classification, ``accuracy`` and ``chance``."""
    batches = list(batches)
    preds = batch_predictions(model, task, batches)
    out = {"loss": float(np.mean(preds["loss"]))}
    if "probs" in preds:
        classes = preds["probs"].shape[1]
        out.update(accuracy=float(np.mean(preds["probs"].argmax(1) == preds["labels"])), chance=1.0 / classes,
                   chance_loss=math.log(classes))
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            heads = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
            vocab = heads[-1] if heads else None
        if vocab:
            out["chance_loss"] = math.log(vocab)
    return out


__all__ = ["PREDICTED_KINDS", "batch_predictions", "checkpoint_quality", "example_predictions"]
