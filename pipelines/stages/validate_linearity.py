"""The linearity check ``tda validate`` reports whenever MAGIC is validated (issue 25).

MAGIC's prediction of a drop is first order: exact derivatives, summed over the dropped rows.
It can only be right where the retrained output changes linearly as the dropped rows' weight
goes from 1 to 0. Under the small-drop protocol (the run's seed and batch order, dropped rows at
weight 0) the check retrains the first ``validate.linearity_subsets`` ground-truth subsets once
more with their dropped rows at weight 0.5 and compares twice that change with the drop's
change (:func:`tda.validation.half_weight_linearity`: Pearson and slope, 1 and 1 when linear).

The retrainings are stored one by one like the ground truth's (:class:`~pipelines.ground_truth.ResultStore`,
in ``<run>/linearity/<spec digest>/``), so a killed validation resumes without retraining them,
and a larger ``linearity_subsets`` adds only the new subsets.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from stores._io import fingerprint
from tda.validation import half_weight_linearity

from pipelines.ground_truth import GroundTruth, ResultStore, job_fingerprint
from pipelines.layout import RunPaths
from pipelines.spec.schema import RunConfig

HALF = 0.5  # the dropped rows' weight in the check's retrainings


def linearity_check(cfg: RunConfig, paths: RunPaths, job: Any, gt: GroundTruth, executor: Any,
                    progress: bool) -> dict[str, Any]:
    """``{"measured": True, "weight": 0.5, pearson, slope, half_ratio, pairs, subsets, linear, verdict}``,
    or ``{"measured": False, "reason": ...}`` where the protocol or the job cannot give it."""
    v = cfg.validate
    if v.protocol != "small-drop":
        return {"measured": False, "reason": "the check needs validate.protocol: small-drop (the run's own seed and "
                                              "batch order); the classic protocol retrains with fresh seeds"}
    if job.batch_order != "fixed":
        return {"measured": False, "reason": "this family's retraining takes no data weights (batch order "
                                              "reshuffled), so a half weight cannot be set"}
    count = min(v.linearity_subsets, gt.spec.n_subsets)
    if count == 0:
        return {"measured": False, "reason": "validate.linearity_subsets is 0"}
    half_job = copy.copy(job)
    half_job.dropped_weight = HALF
    spec = {"job": job_fingerprint(cfg), "n": gt.spec.n, "alpha": gt.spec.alpha, "subset_seed": gt.spec.seed,
            "fixed_seed": gt.spec.fixed_seed, "queries": job.n_queries, "weight": HALF}
    store = ResultStore(paths.root / "linearity" / fingerprint(spec), spec, job.n_queries)
    items = [(f"s{j:04d}", (np.nonzero(gt.masks[j])[0], gt.spec.fixed_seed)) for j in range(count)]
    store.run(half_job, items, executor, "linearity check", progress)
    half = np.stack([store.load(key) for key, _ in items])
    dropped = gt.outputs()[:count, 0]  # small-drop: one model per subset
    return {"measured": True, "weight": HALF,
            **half_weight_linearity(gt.full_outputs(), dropped, half).as_dict()}


def linearity_line(check: dict[str, Any]) -> str:
    """The validation summary's line for the check."""
    if not check["measured"]:
        return f"  linearity (MAGIC): not measured: {check['reason']}"
    return (f"  linearity (MAGIC): {check['subsets']} subsets retrained with the dropped rows at weight "
            f"{check['weight']:g}: {check['verdict']}")
