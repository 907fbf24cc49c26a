"""Does the retraining recipe reproduce the attributed checkpoints? (``tda validate``)

Counterfactual validation retrains the model on subsets; its figures mean something only when
the recipe trains models like the ones attributed. The full-set reference models the ground
truth already trains are compared with the attributed checkpoints on the validated queries: the
mean measured output (the margin, or an LM's log-probability) and, for a classifier, the share of
queries each gets right (``margin > 0``, i.e. ``p(label) > 1/2``). A retrained model far below the
checkpoints (a share lower by more than 0.15, or a mean output lower by more than half its size)
is reported with the keys that set the recipe.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from tda.data.loading import iter_batches
from tda.featurizers.gradient import apply_checkpoint, load_checkpoint

from pipelines.families import family_for
from pipelines.families.capabilities import final_checkpoints
from pipelines.layout import RunPaths, load_checkpoint_list
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)


def checkpoint_outputs(cfg: RunConfig, paths: RunPaths, m: int) -> np.ndarray:
    """(m,) measured output of the first ``m`` queries, averaged over the last checkpoint of every run."""
    family = family_for(cfg)
    task, model = family.task(cfg), family.build_model(cfg)
    query = family.datasets(cfg, paths)["query"].select(range(m))
    outs = []
    for entry in final_checkpoints(load_checkpoint_list(paths)):  # the trained models, not their early epochs
        apply_checkpoint(model, load_checkpoint(paths.checkpoint_file(entry)), f"checkpoint {entry['file']}")
        model.eval()
        with torch.no_grad():
            outs.append(torch.cat([task.output(model, b).double() for _, b in
                                   iter_batches(query, family.collate(cfg), cfg.featurize.batch_size)]).numpy())
    return np.mean(outs, axis=0)


def recipe_check(cfg: RunConfig, paths: RunPaths, retrained: np.ndarray) -> dict[str, Any] | None:
    """Retrained full-set outputs ``(m,)`` against the checkpoints' (None where the task has no such output)."""
    family = family_for(cfg)
    kind = family.task(cfg).kind
    if kind not in ("classification", "causal-lm"):
        return None
    attributed = checkpoint_outputs(cfg, paths, len(retrained))
    out: dict[str, Any] = {"mean_output_retrained": float(retrained.mean()), "mean_output_checkpoints": float(attributed.mean())}
    worse = attributed.mean() - retrained.mean() > 0.5 * abs(attributed.mean())
    if kind == "classification":
        out["correct_retrained"] = float(np.mean(retrained > 0))
        out["correct_checkpoints"] = float(np.mean(attributed > 0))
        worse = worse or out["correct_checkpoints"] - out["correct_retrained"] > 0.15
    out["reproduces"] = not worse
    if worse:
        logger.warning("the retraining recipe does not reproduce the attributed checkpoints (%s); the LDS measures "
                       "another model: set train.optimizer / lr / epochs / schedule / init as your training ran, record "
                       "them with tda.CheckpointRecorder, or set train.factory", out)
    return out


__all__ = ["checkpoint_outputs", "recipe_check"]
