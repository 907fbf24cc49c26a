"""Counterfactual retraining results on disk, resumable, reusable across scorers.

:class:`ResultStore` keeps one ``.npy`` per finished retraining (written atomically, recorded
in ``manifest.json`` at once) so an interrupted validation resumes where it stopped.
:class:`GroundTruth` uses it for LDS: J subsets (masks regenerated from the recorded seed and
checked against a hash) x R seeds, each giving the measured outputs of every query, and (with
``references``) R models trained on the whole set, the reference for group effects and calibration.

Two protocols (docs/methods.md section 6): ``classic`` (random alpha-subsets, fresh seeds per
retraining) and ``small-drop`` (MAGIC / bergson: every retraining uses the attributed run's own
seed, each subset drops a random ``1 - alpha`` share; with a job that takes data weights the
dropped rows get weight 0 and the batch order is the run's).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol

import numpy as np
from tqdm.auto import tqdm

from stores._io import fingerprint, save_json, save_npy, sha256_file
from tda.errors import ConfigError, FingerprintMismatchError, ForeignStoreError, StoreCorruptError
from tda.validation import sample_subsets

from pipelines.spec.schema import PROTOCOLS, RunConfig
from pipelines.spec.fingerprints import stable_dict

FORMAT = "tda-retraining-results"
logger = logging.getLogger(__name__)


class RetrainJob(Protocol):
    """Picklable callable: (row indices of the training data to use, seed) -> (m,) outputs f(z_q)."""

    def __call__(self, task: tuple[np.ndarray, int]) -> np.ndarray: ...


class OnTask:
    """Applies a RetrainJob to the task part of a ``(key, task)`` item (picklable)."""

    def __init__(self, job: Callable) -> None:
        self.job = job

    def __call__(self, item: tuple[Hashable, tuple[np.ndarray, int]]) -> np.ndarray:
        return self.job(item[1])


def _own_temporary(entry: Path, name: str) -> bool:
    """Whether ``entry`` is a temporary file that :func:`stores._io.atomic_write` made for ``name``."""
    return entry.is_file() and not entry.is_symlink() and entry.name.startswith(f".{name}.") and \
        entry.name.endswith(".tmp")


class ResultStore:
    """Folder of finished retrainings keyed by strings, bound to a spec it refuses to mix."""

    def __init__(self, root: str | Path, spec: dict[str, Any], width: int) -> None:
        self.root, self.spec, self.width = Path(root), spec, width
        path = self.root / "manifest.json"
        if path.is_file():
            try:
                self.manifest = json.loads(path.read_text())
            except ValueError as exc:
                raise StoreCorruptError(f"{path} is not valid JSON; delete the folder to recompute") from exc
            if self.manifest.get("format") != FORMAT:
                raise ForeignStoreError(f"{self.root} is not a tda retraining-results folder")
            if self.manifest["spec"] != spec:
                raise FingerprintMismatchError(
                    f"{self.root} holds results for {self.manifest['spec']}, not {spec}; use another folder")
        else:
            if self.root.exists():
                # a kill while the first manifest was being written leaves only its temporary file
                for left in [e for e in self.root.iterdir() if _own_temporary(e, "manifest.json")]:
                    left.unlink()
                if any(self.root.iterdir()):
                    raise ForeignStoreError(f"{self.root} is not empty and has no manifest; choose an empty folder")
            self.manifest = {"format": FORMAT, "spec": spec, "complete": {}}
            save_json(path, self.manifest)

    def _file(self, key: str) -> Path:
        return self.root / "runs" / (key.replace("/", "_") + ".npy")

    def done(self, key: str) -> bool:
        return key in self.manifest["complete"]

    def _intact(self, key: str) -> bool:
        """Whether the file of a finished result holds what was recorded (its sha256)."""
        path, want = self._file(key), self.manifest["complete"][key].get("sha256")
        return path.is_file() and (want is None or sha256_file(path) == want)

    def drop_damaged(self) -> list[str]:
        """Forget finished results whose file is missing or fails its sha256 (they run again)."""
        bad = [key for key in list(self.manifest["complete"]) if not self._intact(key)]
        if bad:
            logger.warning("%s: %d damaged or missing retraining result(s) are recomputed", self.root, len(bad))
            for key in bad:
                del self.manifest["complete"][key]
            save_json(self.root / "manifest.json", self.manifest)
        return bad

    def run(self, job: RetrainJob, items: list[tuple[str, tuple[np.ndarray, int]]], executor: Any,
            desc: str = "retrain", progress: bool = True) -> None:
        """Run the items not yet done (damaged results again); record each result the moment it arrives."""
        self.drop_damaged()
        todo = [it for it in items if not self.done(it[0])]
        bar = tqdm(total=len(todo), desc=desc, unit="model", disable=not progress or not todo)
        for (key, (_, seed)), out in executor.map_unordered(OnTask(job), todo):
            out = np.asarray(out, dtype=np.float64)
            if out.shape != (self.width,) or not np.isfinite(out).all():
                raise StoreCorruptError(f"retraining {key} returned shape {out.shape} or non-finite outputs")
            save_npy(self._file(key), out)
            self.manifest["complete"][key] = {"seed": int(seed), "file": self._file(key).name,
                                              "sha256": sha256_file(self._file(key))}
            save_json(self.root / "manifest.json", self.manifest)
            bar.update(1)
        bar.close()

    def load(self, key: str) -> np.ndarray:
        if not self.done(key):
            raise StoreCorruptError(f"{self.root}: result {key} is missing; rerun to resume")
        if not self._intact(key):
            raise StoreCorruptError(f"{self._file(key)} is missing or fails its recorded sha256; rerun to "
                                    "recompute that retraining")
        return np.load(self._file(key), allow_pickle=False)


@dataclass(frozen=True)
class GroundTruthSpec:
    """n training examples, m queries, J subsets of size floor(alpha n) x R seeds each."""

    n: int
    m: int
    n_subsets: int = 100
    models_per_subset: int = 1
    alpha: float = 0.5
    seed: int = 0
    job: str = ""  # fingerprint of the training recipe and data
    protocol: str = "classic"  # or "small-drop"
    fixed_seed: int = 0  # small-drop: the training seed of every retraining (the attributed run's)
    batch_order: str = ""  # small-drop: "fixed" (zero weights) or "reshuffled" (subset rows)

    def as_dict(self) -> dict[str, Any]:
        """The recorded spec; classic specs leave the small-drop keys out (older caches stay valid)."""
        d = asdict(self)
        if self.protocol == "classic":
            for key in ("protocol", "fixed_seed", "batch_order"):
                d.pop(key)
        return d


def run_seed(base: int, *path: int) -> int:
    """Deterministic training seed for a retraining identified by ``path`` (recorded in manifests)."""
    return int(np.random.SeedSequence([base, *path]).generate_state(1)[0] >> 1)


class GroundTruth:
    """LDS ground truth: ``masks`` (J, n) and measured outputs (J, R, m)."""

    def __init__(self, root: str | Path, spec: GroundTruthSpec, references: bool = False) -> None:
        """``references``: also train models on the whole set (:meth:`full_outputs`, calibration)."""
        if spec.protocol not in PROTOCOLS:
            raise ConfigError(f"validate.protocol is {spec.protocol!r}; use one of {PROTOCOLS}")
        self.spec, self.references = spec, references
        self.masks = sample_subsets(spec.n, spec.n_subsets, spec.alpha, spec.seed)
        digest = hashlib.sha256(np.packbits(self.masks).tobytes()).hexdigest()[:16]
        self.store = ResultStore(root, {**spec.as_dict(), "mask_hash": digest}, spec.m)

    def _seed(self, *path: int) -> int:
        return self.spec.fixed_seed if self.spec.protocol == "small-drop" else run_seed(self.spec.seed, *path)

    def _reference_count(self) -> int:
        return 1 if self.spec.protocol == "small-drop" else self.spec.models_per_subset

    def _items(self) -> list[tuple[str, tuple[np.ndarray, int]]]:
        subsets = [(f"s{j:04d}/r{r:02d}", (np.nonzero(self.masks[j])[0], self._seed(1, j, r)))
                   for j in range(self.spec.n_subsets) for r in range(self.spec.models_per_subset)]
        full = [(f"full/r{r:02d}", (np.arange(self.spec.n), self._seed(3, r))) for r in range(self._reference_count())]
        return subsets + (full if self.references else [])

    def full_outputs(self) -> np.ndarray:
        """(m,) outputs of the models trained on the whole set (mean over their seeds)."""
        if not self.references:
            raise ConfigError("this ground truth was made without full-set references; pass references=True")
        return np.stack([self.store.load(f"full/r{r:02d}") for r in range(self._reference_count())]).mean(axis=0)

    def retrainings(self) -> int:
        """How many models the ground truth trains (subsets x seeds, plus the full-set references)."""
        return len(self._items())

    def pending(self) -> list[str]:
        return [k for k, _ in self._items() if not self.store.done(k)]

    def compute(self, job: RetrainJob, executor: Any, progress: bool = True) -> None:
        self.store.run(job, self._items(), executor, "ground truth", progress)

    def outputs(self) -> np.ndarray:
        """(J, R, m) measured outputs."""
        r_count = self.spec.models_per_subset
        return np.stack([np.stack([self.store.load(f"s{j:04d}/r{r:02d}") for r in range(r_count)])
                         for j in range(self.spec.n_subsets)])

    def mean_outputs(self) -> np.ndarray:
        """(J, m) outputs averaged over the R seeds of each subset."""
        return self.outputs().mean(axis=1)


def job_fingerprint(cfg: RunConfig) -> str:
    """Hash of the retraining recipe and the data it is measured on (keys added later and left at
    their defaults are not hashed, so cached ground truth stays valid across versions)."""
    from pipelines.families.registry import family_for  # families import this module

    d = stable_dict(cfg)
    train = {k: v for k, v in d["train"].items() if k not in ("models", "checkpoints", "seed")}
    return fingerprint({"data": d["data"], "model": d["model"], "train": train, **family_for(cfg).measure_key(cfg)})
