"""``tda unlearn CONFIG``: remove a behaviour by removing the training data that drives it, and check.

The behaviour is a group of the run's queries (``unlearn.queries``, or every query of
``unlearn.query_class``, by default the first query's class) and its output, the sum of their
measured outputs (margins). The forget set is the top-k training examples by attributed effect on
the group, ``e_i = sum_{j in group} score_ji``; removing a set S is predicted to change query j's
output by ``-sum_{i in S} score_ji`` (the linear datamodel the validator measures), and, where
``tda validate`` has run, by the calibrated ``intercept * k / group_size + slope * predicted`` of its
fitted line (fitted on removals of ``group_size`` rows; its intercept, the effect of removing that
many rows whatever their scores, is scaled to the k rows removed).
A random set of the same size is the control. The exact check retrains without the forget set,
without the control and on the full data, R paired seeds each (resumable), and reports predicted
against actual change per query and for the group, with the query-set accuracy of each arm.

Output: ``unlearning/unlearning.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from stores import scores_files, workflow_results
from stores._io import save_json
from tda.errors import ConfigError, StoreError

from pipelines.workflows.curate_check import interval, run_arms
from pipelines.families import family_for
from pipelines.layout import RunPaths, fingerprint_version
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)


def stored_scores(paths: RunPaths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores (m, n), query ids, train ids)`` of the run's score stage."""
    if not scores_files.has_dense(paths.scores):
        raise StoreError(f"{scores_files.scores_path(paths.scores)} is missing: tda unlearn reads the dense scores; "
                         "rerun with score.dense: true (`tda run CONFIG --from score --set score.dense=true`)")
    return scores_files.load_dense(paths.scores)


def behaviour(cfg: RunConfig, query_ids: np.ndarray, query_labels: dict[int, int]) -> tuple[np.ndarray, str]:
    """Rows of the group's queries and a description."""
    u, pos = cfg.unlearn, {int(q): r for r, q in enumerate(query_ids)}
    if u.queries is not None:
        bad = [q for q in u.queries if q not in pos]
        if bad:
            raise ConfigError(f"unlearn.queries names ids {bad[:5]} that are not among the run's {len(pos)} queries "
                              f"(ids {int(query_ids.min())}..{int(query_ids.max())})")
        return np.array([pos[q] for q in u.queries]), f"queries {list(u.queries)[:10]}"
    if not query_labels:  # no classes (language models): the first query, unless named
        if u.query_class is not None:
            raise ConfigError("unlearn.query_class needs class labels, and this family has none; name unlearn.queries")
        return np.array([0]), f"query {int(query_ids[0])}"
    cls = u.query_class if u.query_class is not None else query_labels[int(query_ids[0])]
    rows = np.array([r for r, q in enumerate(query_ids) if query_labels.get(int(q)) == cls])
    if not len(rows):
        raise ConfigError(f"no query has class {cls}; set unlearn.query_class to one of {sorted(set(query_labels.values()))}")
    return rows, f"the {len(rows)} queries of class {cls}"


def forget_set(effect: np.ndarray, scores_g: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """Training rows to forget: the top-k by ``effect``; k given, or the smallest whose predicted
    group change reaches ``unlearn.target_change``, else 2 % of the training set."""
    u = cfg.unlearn
    raising = u.target_change is not None and u.target_change > 0  # raise the output: forget its opponents
    order = np.argsort(effect if raising else -effect, kind="stable")
    if u.k is not None:
        k = min(u.k, len(order))
    elif u.target_change is not None:
        predicted = -np.cumsum(scores_g.sum(axis=0)[order])  # group change after removing the first 1, 2, ...
        reach = np.nonzero(predicted >= u.target_change if raising else predicted <= u.target_change)[0]
        if not len(reach):
            most = predicted.max() if raising else predicted.min()
            raise ConfigError(f"no forget set reaches unlearn.target_change {u.target_change:g} (the most predicted "
                              f"is {most:.4g}); set a smaller target or k")
        k = int(reach[0]) + 1
    else:
        k = max(1, int(round(0.02 * len(order))))
    return np.sort(order[:k])


def calibration_for(cfg: RunConfig, paths: RunPaths) -> dict[str, Any] | None:
    """The validator's fitted line for the run's scorer, or None when ``tda validate`` has not run
    on these scores (another scorer, ridge, feature or data setting: its line would be wrong), or
    its ``validation.json`` cannot be read."""
    from pipelines.spec.fingerprints import SCORE_SECTIONS, section_fingerprint

    path = workflow_results.path(paths.root, "validation")
    try:
        record = workflow_results.load(paths.root, "validation")
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("scores_fingerprint") != section_fingerprint(
            cfg, *SCORE_SECTIONS, outputs=False, version=fingerprint_version(paths)):
        if path.is_file():
            logger.warning("%s was made for other scores (another scorer or setting): its calibration is not used; "
                           "run `tda validate` with this config to calibrate", path)
        return None
    entry = record.get("scorers", {}).get(cfg.score.scorer)
    fit = (entry or {}).get("calibration", {}).get("fit") if isinstance(entry, dict) else None
    if not (isinstance(fit, dict) and {"intercept", "slope"} <= set(fit)):
        return None
    low = (fit.get("slope_ci") or [fit["slope"]])[0]
    if not (fit["slope"] > 0 and low > 0):  # scores that do not predict the change: its line would flip signs
        logger.warning("the validator's calibration of %s has slope %.3g (95%% interval from %.3g): the scores do not "
                       "predict retraining there, so predictions stay uncalibrated", cfg.score.scorer, fit["slope"], low)
        return None
    return fit


def predictions(scores_g: np.ndarray, rows: np.ndarray, cal: dict[str, Any] | None) -> dict[str, Any]:
    """Predicted change per group query of removing ``rows``, raw and calibrated."""
    raw = -scores_g[:, rows].sum(axis=1)
    out: dict[str, Any] = {"per_query": raw.tolist(), "group": float(raw.sum())}
    if cal is not None:
        # the intercept is the validator's mean effect of removing group_size rows whatever their scores;
        # to first order it scales with the rows removed
        intercept = cal["intercept"] * len(rows) / cal.get("group_size", len(rows))
        calibrated = intercept + cal["slope"] * raw
        out["calibrated"] = {"per_query": calibrated.tolist(), "group": float(calibrated.sum()),
                             "intercept_scaled_by": f"k / group_size = {len(rows)} / {cal.get('group_size', len(rows))}"}
    return out


def stage_unlearn(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, Any]:
    """Forget set, predictions and the retraining check; writes ``unlearning/unlearning.json``."""
    family = family_for(cfg)
    if not hasattr(family, "unlearning_job"):
        raise ConfigError(f"tda unlearn supports the classifier family for now; the {family.name!r} family has no "
                          "unlearning retraining yet")
    scores, query_ids, train_ids = stored_scores(paths)
    from pipelines.families.base import collated

    labels: dict[int, int] = {}
    label_key = family.task(cfg).label_key if family.unlearning_hits_of(cfg) else None
    if label_key is not None:
        query_b = collated(family.datasets(cfg, paths)["query"], family.collate(cfg))
        labels = {int(q): int(y) for q, y in zip(query_ids, query_b[label_key].numpy())}
    group, what = behaviour(cfg, query_ids, labels)
    effect = scores[group].sum(axis=0)
    forget = forget_set(effect, scores[group], cfg)
    control = np.sort(np.random.default_rng([cfg.unlearn.seed, 5303]).choice(len(train_ids), len(forget), replace=False))
    cal = calibration_for(cfg, paths)
    res: dict[str, Any] = {
        "behaviour": what, "group_query_ids": query_ids[group].tolist(), "output": "sum of the group's margins" if labels else "sum of the group's completion log-probabilities",
        "scorer": cfg.score.scorer, "k": len(forget), "forget_ids": train_ids[forget].tolist(),
        "predicted": predictions(scores[group], forget, cal), "control_predicted": predictions(scores[group], control, cal),
        "calibration": cal if cal is not None else "uncalibrated: run `tda validate` for a calibrated prediction"}
    retrained = None
    if cfg.unlearn.retrain_seeds:
        res["check"], retrained = exact_check(cfg, family, paths, group, forget, control, len(train_ids), progress)
        res["check"]["spearman_predicted_actual"] = agreement(res["predicted"]["per_query"],
                                                              res["check"]["forget"]["actual_per_query"])
    if cfg.unlearn.approximate:
        res["approximate"] = approximate_cached(cfg, family, paths, forget, retrained)
    workflow_results.save(paths.root, "unlearning", res)
    return res


def exact_check(cfg: RunConfig, family: Any, paths: RunPaths, group: np.ndarray, forget: np.ndarray,
                control: np.ndarray, n_train: int, progress: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Retrain without the forget set, without the control and on everything; actual changes, and
    the (R, m) query margins of the models retrained without the forget set."""
    everything = np.arange(n_train)
    keep = {"forget": np.setdiff1d(everything, forget), "control": np.setdiff1d(everything, control), "full": everything}
    seeds = [20_000 + 100 * cfg.unlearn.seed + r for r in range(cfg.unlearn.retrain_seeds)]
    out = run_arms(cfg, family.unlearning_job(cfg), keep, seeds, paths.root / "unlearning" / "retrain",
                   {"measure": "margin+hit"}, "unlearn: retrain", progress)
    with_hits = family.unlearning_hits_of(cfg)  # classifiers: margins then top-1 hits; LMs: log-probs
    m = out["full"].shape[1] // 2 if with_hits else out["full"].shape[1]
    margin = {arm: o[:, :m] for arm, o in out.items()}
    hits = {arm: o[:, m:] for arm, o in out.items()}
    others = np.setdiff1d(np.arange(m), group)
    res: dict[str, Any] = {"seeds": len(seeds)}
    for arm in ("forget", "control"):
        change = margin[arm][:, group] - margin["full"][:, group]  # (R, |G|), paired seeds
        res[arm] = {"actual_per_query": change.mean(axis=0).tolist(), "actual_group": interval(change.sum(axis=1))}
    for arm in keep if with_hits else ():
        unit = (0.0, 1.0)  # accuracies: their intervals stay in [0, 1]
        res.setdefault(arm, {})["accuracy"] = {"all_queries": interval(hits[arm].mean(axis=1), unit),
                                              "group": interval(hits[arm][:, group].mean(axis=1), unit),
                                              "other_queries": interval(hits[arm][:, others].mean(axis=1), unit)
                                              if len(others) else None}
    return res, margin["forget"]


def approximate_cached(cfg: RunConfig, family: Any, paths: RunPaths, forget: np.ndarray,
                       retrained: np.ndarray | None) -> dict[str, Any]:
    """:func:`~pipelines.workflows.unlearn_approx.approximate_unlearning`, reused when nothing it depends on
    changed (the run's model and data, the unlearn settings, the forget set, the retrained outputs),
    so a rerun of a finished ``tda unlearn`` reproduces its figures exactly instead of to float rounding."""
    from stores._io import fingerprint

    from pipelines.ground_truth import job_fingerprint
    from pipelines.workflows.unlearn_approx import approximate_unlearning

    key = fingerprint({"job": job_fingerprint(cfg), "unlearn": dataclasses.asdict(cfg.unlearn),
                       "forget": np.asarray(forget).tolist(),
                       "retrained": None if retrained is None else np.round(np.asarray(retrained), 12).tolist()})
    cache = paths.root / "unlearning" / "approximate.json"
    try:
        saved = json.loads(cache.read_text())
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("result"), dict):
            return saved["result"]
    except (OSError, ValueError):
        pass
    result = approximate_unlearning(cfg, family, paths, forget, retrained)
    save_json(cache, {"key": key, "result": result})
    return result


def agreement(predicted: list[float], actual: list[float]) -> float | None:
    """Spearman correlation of predicted and actual per-query changes (None under 3 queries)."""
    if len(predicted) < 3:
        return None
    rho = spearmanr(predicted, actual).statistic
    return None if np.isnan(rho) else float(rho)


__all__ = ["agreement", "behaviour", "calibration_for", "exact_check", "forget_set", "predictions", "stage_unlearn",
           "stored_scores"]
