"""The check a curation user trusts: retrain without the top share flagged, and without a random
share of the same size, R seeds each (paired: the same seeds in both arms), and compare accuracy
on the run's queries. Each retraining is saved as it finishes, so an interrupted check resumes
without redoing or duplicating one; a change of configuration or of the flagged rows starts afresh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from stores._io import fingerprint, remove_tree, save_json, save_npy, sha256_file

from pipelines.executors import make_executor
from pipelines.ground_truth import OnTask, job_fingerprint
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)


def arm_rows(order: np.ndarray, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Kept row indices per arm: all but the top ``fraction`` of ``order`` (rows, most suspect
    first), and all but a seeded random set of the same size."""
    n = len(order)
    drop = max(1, int(round(fraction * n)))
    random_drop = np.random.default_rng([seed, 4111]).choice(n, size=drop, replace=False)
    keep = {"flagged": np.setdiff1d(np.arange(n), order[:drop]), "random": np.setdiff1d(np.arange(n), random_drop)}
    return {arm: np.sort(rows) for arm, rows in keep.items()}


def interval(values: np.ndarray, bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean and 95 % t-interval over seeds (the interval is the mean itself for one seed), clipped
    to ``bounds`` where the quantity has them (an accuracy lies in [0, 1]; two seeds' t-interval
    can reach far outside)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci_low": low, "ci_high": high}


#: sha256 of every saved retraining, beside them: a damaged file is retrained, never reused
DIGEST_FILE = "sha256.json"


def _digests(folder: Path) -> dict[str, str]:
    try:
        value = json.loads((folder / DIGEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _intact(folder: Path, name: str) -> bool:
    """The retraining ``name`` exists and matches the sha256 recorded when it was saved."""
    path, want = folder / name, _digests(folder).get(name)
    if not path.is_file():
        return False
    if want is None or sha256_file(path) != want:
        logger.warning("%s does not match its recorded sha256: retraining it", path)
        return False
    return True


def _save_checked(folder: Path, name: str, values: np.ndarray) -> None:
    """Save one retraining's outputs, then record its sha256 (a kill between leaves it unrecorded: redone)."""
    save_npy(folder / name, values)
    save_json(folder / DIGEST_FILE, {**_digests(folder), name: sha256_file(folder / name)})


def _prepare(folder: Path, spec: dict[str, Any]) -> None:
    """Keep finished retrainings only if they were made for ``spec``."""
    spec_file = folder / "spec.json"
    if folder.is_dir():
        try:
            same = json.loads(spec_file.read_text()) == spec
        except (OSError, ValueError):
            same = False
        if not same:
            remove_tree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_json(spec_file, spec)


def run_arms(cfg: RunConfig, job: Any, keep: dict[str, np.ndarray], seeds: list[int], folder: Path,
             spec: dict[str, Any], desc: str, progress: bool) -> dict[str, np.ndarray]:
    """Train ``job`` on each arm's kept rows with each seed (resumable under ``folder``; ``spec``
    names what the saved retrainings were made for); per arm the (seeds, width) outputs."""
    spec = {**spec, "job": job_fingerprint(cfg), "seeds": seeds,
            "rows": {arm: fingerprint(rows.tolist()) for arm, rows in keep.items()}}
    _prepare(folder, spec)
    todo = [(arm, s) for arm in keep for s in seeds if not _intact(folder, f"{arm}-{s}.npy")]
    if todo:
        e = cfg.executor
        bar = tqdm(total=len(todo), desc=desc, unit="model", disable=not progress)
        with make_executor(e.kind, e.address, e.workers) as executor:
            items = [((arm, s), (keep[arm], s)) for arm, s in todo]
            for ((arm, s), _), out in executor.map_unordered(OnTask(job), items):
                _save_checked(folder, f"{arm}-{s}.npy", np.asarray(out, dtype=np.float64))
                bar.update()
        bar.close()
    return {arm: np.stack([np.load(folder / f"{arm}-{s}.npy") for s in seeds]) for arm in keep}


def retrain_check(cfg: RunConfig, job: Any, order: np.ndarray, folder: Path, progress: bool,
                  metric: str = "accuracy") -> dict[str, Any]:
    """Run (or resume) the check; the query ``metric`` per arm (the mean of the job's per-query
    outputs: top-1 accuracy for a classifier, completion log-probability for an LM) with
    intervals, and the paired difference."""
    c = cfg.curate
    keep = arm_rows(order, c.remove_fraction, c.seed)
    seeds = [10_000 + 100 * c.seed + r for r in range(c.retrain_seeds)]
    measure = "correct" if metric == "accuracy" else metric
    hits = run_arms(cfg, job, keep, seeds, folder, {"measure": measure, "fraction": c.remove_fraction},
                    "curate: retrain", progress)
    acc = {arm: h.mean(axis=1) for arm, h in hits.items()}
    return {"remove_fraction": c.remove_fraction, "removed": int(len(order) - len(keep["flagged"])),
            "seeds": len(seeds), "metric": metric,
            metric: {arm: {**interval(a, (0.0, 1.0) if metric == "accuracy" else None), "per_seed": a.tolist()}
                     for arm, a in acc.items()},
            "flagged_minus_random": interval(acc["flagged"] - acc["random"], (-1.0, 1.0) if metric == "accuracy" else None)}


__all__ = ["arm_rows", "interval", "retrain_check", "run_arms"]
