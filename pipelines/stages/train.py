"""The train stage: train the family's models, or register checkpoints trained elsewhere.

Training saves a checkpoint at each of the family's checkpoint epochs and records it (file,
sha256, the recipe's summary: accuracy, learning rate) in ``checkpoints/checkpoints.json``;
finished models are skipped on a rerun. With ``model.checkpoints`` nothing is trained: each file
is loaded into the family's model (a key or shape mismatch is an error listing the first
differences) and recorded with its sha256, so the featurize stage refuses a file changed later.
A model whose training diverged (non-finite weights, or accuracy at chance) is reported.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stores._io import atomic_write, save_json, sha256_file
from tda.errors import CheckpointError, NonFiniteError
from tda.featurizers.gradient import apply_checkpoint, load_checkpoint

from pipelines.families import family_for
from pipelines.layout import RunPaths, checkpoint_digest, json_field
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)


def stage_train(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> list[dict[str, Any]]:
    """Train ``cfg.train.models`` models with the family's recipe (or register
    ``model.checkpoints``); returns the attributed checkpoints."""
    if cfg.model.checkpoints or family_for(cfg).default_checkpoints(cfg):
        return register_checkpoints(cfg, paths)
    return train_models(cfg, paths, progress)


def register_checkpoints(cfg: RunConfig, paths: RunPaths) -> list[dict[str, Any]]:
    """Check each ``model.checkpoints`` file (default: the family's, e.g. a Hugging Face folder's
    own weights) against the family's model, measure it on a training sample
    (:mod:`.input_check`) and record it, with what :class:`tda.CheckpointRecorder` recorded
    beside it (learning rate, step, epoch, the training recipe)."""
    from pipelines.stages.input_check import check_inputs

    family = family_for(cfg)
    model = family.build_model(cfg)
    entries, files, recipes = [], [Path(f) for f in cfg.model.checkpoints or family.default_checkpoints(cfg)], []
    for i, path in enumerate(files):
        state = load_checkpoint(path)
        apply_checkpoint(model, state, f"checkpoint {path}")
        bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(f"checkpoint {path} holds NaN or infinite weights in {bad[:5]}; a diverged training "
                                 "run gives these: retrain it (a lower learning rate) or drop it from model.checkpoints")
        recorded, recipe = recorded_entry(path)
        recipes.append(recipe)
        entries.append({"model": i, "epoch": 0, "file": str(path.resolve()), "sha256": checkpoint_digest(path), "id": i,
                        **recorded})
    seen: dict[str, str] = {}
    for entry in entries:
        if entry["sha256"] in seen:
            raise CheckpointError(f"model.checkpoints lists the same weights twice ({seen[entry['sha256']]} and "
                                  f"{entry['file']}): each would count as another checkpoint; list each once")
        seen[entry["sha256"]] = entry["file"]
    check_inputs(cfg, model, entries, files)
    listing = {"all": entries, "checkpoints": entries}
    if recipes and all(r is not None and r == recipes[0] for r in recipes):
        listing["recipe"] = recipes[0]
    if json_field(paths.checkpoint_list, "checkpoints") != entries or json_field(paths.checkpoint_list, "recipe") != \
            listing.get("recipe"):
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        save_json(paths.checkpoint_list, listing)
    return entries


def recorded_entry(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``({"lr", "step", "recorded_epoch", "recorded_model"}, recipe)`` that a recorder's
    ``tda-checkpoints.json`` in the checkpoint's folder (or the one above: runs recorded into
    sub-folders) holds for it; empty and None without one."""
    from tda.models.recording import read_manifest

    target = path.resolve()
    for folder in (path.parent, path.parent.parent):
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        for entry in manifest.get("checkpoints", []):
            if (folder / entry.get("file", "")).resolve() == target:
                info = {"lr": entry.get("lr"), "step": entry.get("step"), "recorded_epoch": entry.get("epoch"),
                        "recorded_model": entry.get("model")}
                return {k: v for k, v in info.items() if v is not None}, manifest.get("recipe")
        return {}, manifest.get("recipe")
    return {}, None


def train_models(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> list[dict[str, Any]]:
    """Train with the family's recipe, saving a checkpoint at each of its checkpoint epochs;
    skip finished models."""
    family = family_for(cfg)
    epochs = family.checkpoint_epochs(cfg)
    done = {(c["model"], c["epoch"]): c for c in _read_list(paths)}
    bar = tqdm(range(cfg.train.models), desc="train", unit="model", disable=not progress)
    for m in bar:
        if (all((m, e) in done and paths.checkpoint(m, e).is_file() for e in epochs)
                and all(p.is_file() for p in family.train_outputs(cfg, paths, m))):
            continue

        def save(epoch: int, model: torch.nn.Module, m: int = m, **info: Any) -> None:
            path = paths.checkpoint(m, epoch)
            atomic_write(path, lambda tmp: tmp.write_bytes(state_bytes(model)))
            done[(m, epoch)] = {"model": m, "epoch": epoch, "file": path.name, "sha256": sha256_file(path), **info}

        summary = family.train(cfg, paths, m, save)
        done[(m, epochs[-1])].update(summary)
        check_trained(cfg, paths.checkpoint(m, epochs[-1]), summary)
        bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in summary.items()})
        _write_list(paths, done)
    return _selected(cfg, paths)


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict as ``torch.save`` bytes, saved through memory so that the archive
    does not record the temporary file's name (identical training gives identical files)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


#: share of the way from chance to perfect training accuracy below which a model is called near chance
NEAR_CHANCE = 0.25


def check_trained(cfg: RunConfig, path: Path, summary: dict[str, Any]) -> None:
    """Refuse a model whose weights are not finite; warn when its accuracy is at chance."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    big = max((float(v.abs().max()) for v in state.values() if v.is_floating_point() and v.numel()), default=0.0)
    if bad or not math.isfinite(big) or big > 1e6:
        raise NonFiniteError(f"training diverged: {path.name} has {'NaN/inf' if bad else f'weights up to {big:.3g}'} "
                             f"(train.lr is {cfg.train.lr:g}); lower train.lr and rerun with --overwrite")
    acc, chance = summary.get("train_accuracy"), 1.0 / max(2, _classes(cfg))
    if acc is not None and acc < chance + NEAR_CHANCE * (1.0 - chance):
        logger.warning("model %s reaches only %.3f training accuracy (chance is %.3f): its attributions mean "
                       "little; check train.lr / train.epochs", path.name, acc, chance)


def _classes(cfg: RunConfig) -> int:
    from pipelines.families.images import IMAGE_DATA

    return IMAGE_DATA.get(cfg.data.name, (None, 10))[1]


def _read_list(paths: RunPaths) -> list[dict[str, Any]]:
    """Every checkpoint trained so far; none when the list is missing or damaged (its models are
    then trained again, deterministically, and the list rewritten)."""
    entries = json_field(paths.checkpoint_list, "all")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"model", "epoch"} <= set(e) for e in entries):
        if paths.checkpoint_list.is_file():
            logger.warning("%s is damaged: its models are trained again", paths.checkpoint_list)
        return []
    return entries


def _write_list(paths: RunPaths, done: dict) -> None:
    entries = [done[k] for k in sorted(done)]
    save_json(paths.checkpoint_list, {"all": entries, "checkpoints": []})


def _selected(cfg: RunConfig, paths: RunPaths) -> list[dict[str, Any]]:
    """The attributed checkpoints, numbered 0..C-1, recorded in checkpoints.json."""
    entries = _read_list(paths)
    last = cfg.train.epochs - 1
    chosen = [e for e in entries if cfg.train.checkpoints == "all" or e["epoch"] == last]
    chosen = [{**e, "id": i} for i, e in enumerate(chosen)]
    listing = {"all": entries, "checkpoints": chosen}
    if json_field(paths.checkpoint_list, "checkpoints") != chosen or json_field(paths.checkpoint_list, "all") != entries:
        save_json(paths.checkpoint_list, listing)  # rewritten only when it changes: a rerun touches nothing
    return chosen
