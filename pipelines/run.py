"""A run folder: paths of every artifact (pure functions of the root) and shared loaders."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stores._io import save_json
from tda.data import arrow_columns, example_ids, load_mnist, mnist_collate
from tda.errors import CheckpointError, FingerprintMismatchError, ForeignStoreError
from tda.featurize import Featurizer
from tda.models import mlp
from tda.tasks import ClassificationTask

from .config import FEATURE_SECTIONS, RunConfig, section_fingerprint

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
    """Refuse a folder holding another configuration's outputs unless ``overwrite``."""
    import shutil

    fp = section_fingerprint(cfg, *FEATURE_SECTIONS)
    paths = RunPaths(root)
    if paths.run_file.is_file():
        old = json.loads(paths.run_file.read_text())
        if old.get("feature_fingerprint") != fp:
            if not overwrite:
                raise FingerprintMismatchError(
                    f"{root} holds outputs of a different configuration (data/model/train/featurize "
                    "differ); pass --overwrite to replace them or choose another out_dir"
                )
            for child in root.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif root.exists() and any(p.name != ".lock" for p in root.iterdir()):
        if not overwrite:
            raise ForeignStoreError(f"{root} is not empty and is not a tda run folder; choose an empty out_dir")
    root.mkdir(parents=True, exist_ok=True)
    save_json(paths.run_file, {"format": "tda-run", "feature_fingerprint": fp, "config": cfg.to_dict()})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("featurize.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


@functools.lru_cache(maxsize=4)
def load_split(root: str, split: str, limit: int | None):
    """Cached MNIST split as a ``datasets.Dataset``."""
    return load_mnist(root, split, limit)


def datasets_for(cfg: RunConfig) -> dict[str, Any]:
    """The train and query data sets of a run."""
    return {"train": load_split(cfg.data.root, "train", cfg.data.train_size),
            "query": load_split(cfg.data.root, cfg.data.query_split, cfg.data.query_size)}


def build_model(cfg: RunConfig) -> torch.nn.Module:
    return mlp(784, tuple(cfg.model.hidden), 10)


def make_featurizer(cfg: RunConfig) -> Featurizer:
    f = cfg.featurize
    return Featurizer(build_model(cfg), ClassificationTask(), k=f.k, seed=f.seed, kind=f.projector,
                      param_names=f.params, device=resolve_device(f.device), backend=f.backend)


def collate_for(cfg: RunConfig):
    return mnist_collate


def load_checkpoint_list(paths: RunPaths) -> list[dict[str, Any]]:
    if not paths.checkpoint_list.is_file():
        raise CheckpointError(f"{paths.checkpoint_list} is missing; run the train stage first")
    return json.loads(paths.checkpoint_list.read_text())["checkpoints"]


def as_numpy_batch(dataset) -> dict[str, torch.Tensor]:
    """Whole dataset collated at once (for training the small demo models)."""
    return mnist_collate(arrow_columns(dataset.with_format("arrow")[:]))


def ids_to_rows(dataset) -> dict[int, int]:
    return {int(i): r for r, i in enumerate(np.asarray(example_ids(dataset)))}
