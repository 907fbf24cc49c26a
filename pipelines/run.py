"""A run folder: paths of every artifact (pure functions of the root) and shared loaders.

What depends on the kind of model (data, model, task, collate, featurizer) comes from the run's
model family (:mod:`pipelines.families`); the functions here dispatch to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stores._io import save_json
from tda.data import arrow_columns, example_ids, mnist_collate
from tda.errors import FingerprintMismatchError, ForeignStoreError, StoreCorruptError

from .config import FEATURE_SECTIONS, QUERY_KEYS, RunConfig, section_fingerprint  # noqa: F401
from .families import family_for, load_checkpoint_list, load_idx_split, resolve_device  # noqa: F401

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunPaths:
    """Where each artifact of a run lives."""

    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint_list(self) -> Path:
        return self.checkpoints / "checkpoints.json"

    def checkpoint(self, model: int, epoch: int) -> Path:
        return self.checkpoints / f"model-{model:02d}-epoch-{epoch:03d}.pt"

    def store(self, split: str) -> Path:
        return self.root / f"features-{split}"

    @property
    def scorer(self) -> Path:
        return self.root / "scorer"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def scores(self) -> Path:
        return self.root / "scores"


def claim_run_dir(cfg: RunConfig, root: Path, overwrite: bool) -> None:
    """Refuse a folder holding another configuration's outputs unless ``overwrite``.

    The run belongs to the training side of the configuration (data, model, train, featurize,
    without the choice of queries): a run with other queries reuses its checkpoints and train
    features. ``run.json`` is rewritten only when the configuration changed.
    """
    import shutil

    fp = feature_fingerprint(cfg, "train")
    paths = RunPaths(root)
    record = {"format": "tda-run", "feature_fingerprint": fp, "config": cfg.to_dict()}
    old = None
    if paths.run_file.is_file():
        try:
            old = json.loads(paths.run_file.read_text())
        except (OSError, ValueError) as exc:
            if not overwrite:
                raise StoreCorruptError(f"{paths.run_file} is not valid JSON ({exc}); restore it, or pass "
                                        "--overwrite to replace the run folder") from exc
        if not isinstance(old, dict) or old.get("feature_fingerprint") != fp:
            if not overwrite:
                raise FingerprintMismatchError(
                    f"{root} holds outputs of a different configuration (data/model/train/featurize "
                    "differ); pass --overwrite to replace them or choose another out_dir"
                )
            for child in root.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            old = None
    elif root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        if not overwrite:
            raise ForeignStoreError(f"{root} is not empty and is not a tda run folder; choose an empty out_dir")
    root.mkdir(parents=True, exist_ok=True)
    if old != json.loads(json.dumps(record)):
        save_json(paths.run_file, record)


def feature_fingerprint(cfg: RunConfig, split: str = "query") -> str:
    """Hash of everything the stored features of ``split`` depend on (config sections plus the
    family's tag); ``split="train"`` leaves out the choice of queries (:data:`QUERY_KEYS`)."""
    return section_fingerprint(cfg, *FEATURE_SECTIONS, queries=split != "train") + family_for(cfg).feature_tag(cfg)


def load_split(root: str, split: str, limit: int | None):
    """Cached MNIST split as a ``datasets.Dataset``."""
    return load_idx_split(root, split, limit)


def datasets_for(cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
    """The train and query data sets of a run (``paths``: the run folder, for run-made queries)."""
    return family_for(cfg).datasets(cfg, paths)


def build_model(cfg: RunConfig) -> torch.nn.Module:
    return family_for(cfg).build_model(cfg)


def make_featurizer(cfg: RunConfig, split: str = "train", paths: RunPaths | None = None):
    """The featurizer of ``split`` (the classifier family uses one for both splits)."""
    return family_for(cfg).featurizer(cfg, split, paths)


def collate_for(cfg: RunConfig):
    return family_for(cfg).collate(cfg)


def as_numpy_batch(dataset, cfg: RunConfig | None = None) -> dict[str, torch.Tensor]:
    """Whole dataset collated at once (for training the small demo models); MNIST without ``cfg``."""
    collate = mnist_collate if cfg is None else collate_for(cfg)
    return collate(arrow_columns(dataset.with_format("arrow")[:]))


def ids_to_rows(dataset) -> dict[int, int]:
    return {int(i): r for r, i in enumerate(np.asarray(example_ids(dataset)))}
