"""Before featurizing: do the data reach the checkpoints the way they were trained?

Each attributed checkpoint is run on a sample of the training set through the configured collate
(:func:`tda.featurizers.predictions.checkpoint_quality`); its accuracy and mean loss are recorded in
``checkpoints/checkpoints.json``. A checkpoint that is supposed to be trained
(``model.check_trained``, the default) but scores no better than a guess -- a mean loss above a
uniform guess's ``log C`` (``log V`` for a language model: confidently wrong, as inputs scaled
differently from training give), or within 3 % of it with an accuracy below a quarter of the way
from chance to perfect (a model that learned nothing from these inputs) -- is refused with the likely causes and the keys that fix them (judged on the last checkpoint of each training run; an early epoch of a
recorded run that scores near chance is only a warning): inputs scaled
differently from training (``data.image_scale``), images in another layout
(``data.image_layout``), another tokenizer (``data.tokenizer``), labels mapped differently
(``data.label_column``) or the collate (``data.collate``). A model that cannot run on the batch
at all is refused the same way.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from tda.data.loading import iter_batches
from tda.errors import DataError
from tda.featurizers.gradient import apply_checkpoint, batch_error, load_checkpoint
from tda.featurizers.predictions import PREDICTED_KINDS, checkpoint_quality

from pipelines.families import family_for
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)

#: training rows each checkpoint is checked on
SAMPLE_ROWS = 256
#: share of the way from chance to perfect accuracy below which a checkpoint is called near chance
NEAR_CHANCE = 0.25
#: a mean loss above this share of a uniform guess's (log C, log V) learned next to nothing
NEAR_UNIFORM = 0.97


def _fixes(cfg: RunConfig, kind: str) -> str:
    d = cfg.data
    if kind == "causal-lm":
        return (f"the tokenizer differs from training (data.tokenizer, now {d.tokenizer or 'the model folder'}), or "
                f"the text column is another (data.text_column {d.text_column!r})")
    hints = [f"labels map to other classes than in training (data.label_column {d.label_column!r})"]
    if cfg.model.family == "hf":
        hints.insert(0, f"the tokenizer differs from training (data.tokenizer) or the text column (data.text_column "
                        f"{d.text_column!r})")
    elif not d.collate:
        hints.insert(0, f"inputs are scaled differently from training (data.image_scale, now {d.image_scale!r}: "
                        f"'auto' divides integer pixels by 255) or laid out differently (data.image_layout, now "
                        f"{d.image_layout!r}: 'HWC' or 'CHW' feed 3-D images as (C, H, W) and give 2-D ones a channel "
                        "axis, (1, H, W); 'stored' feeds them as stored)")
    return "; ".join(hints) + (f"; or your data.collate {d.collate} differs from training" if d.collate else "")


def verdict(cfg: RunConfig, kind: str, name: str, q: dict[str, float], rows: int) -> str | None:
    """Why checkpoint ``name`` looks untrained on these inputs, or None when it does not."""
    acc, chance, guess = q.get("accuracy"), q.get("chance"), q.get("chance_loss")
    high_loss = guess is not None and q["loss"] > guess
    uniform = guess is not None and q["loss"] > NEAR_UNIFORM * guess  # no better than a uniform guess
    low_acc = acc is not None and acc < chance + NEAR_CHANCE * (1.0 - chance)
    if not (high_loss or (uniform and (low_acc or acc is None))):
        return None
    seen = (f"accuracy {acc:.3f} (chance {chance:.3f}), " if acc is not None else "") + \
        f"mean loss {q['loss']:.3g}" + (f" (a uniform guess scores {q['chance_loss']:.3g})" if "chance_loss" in q else "")
    shape = ("accuracy well above chance with a loss above a uniform guess's means confidently wrong answers, as "
             "inputs scaled up from what the model was trained on give" if (high_loss and not low_acc) else
             "it looks untrained on these inputs")
    return (f"checkpoint {name} scores {seen} on {rows} training rows fed through the configured collate: {shape}. "
            f"Likely causes: {_fixes(cfg, kind)}. If the checkpoints really are untrained, set model.check_trained: false")


def check_inputs(cfg: RunConfig, model: nn.Module, entries: list[dict[str, Any]], files: list[Any]) -> None:
    """Measure every checkpoint on a training sample, record it in ``entries`` (in place) and
    refuse near-chance ones unless ``model.check_trained`` is false."""
    family = family_for(cfg)
    task = family.task(cfg)
    if task.kind not in PREDICTED_KINDS:
        return
    train = family.datasets(cfg)["train"]
    rows = min(SAMPLE_ROWS, len(train))
    batches = [b for _, b in iter_batches(train.select(range(rows)), family.collate(cfg), 64)]
    from pipelines.families.capabilities import final_checkpoints

    finals = {id(e) for e in final_checkpoints(entries)}  # early epochs of a recorded run may be weak by design
    for entry, file in zip(entries, files):
        apply_checkpoint(model, load_checkpoint(file), f"checkpoint {file}")
        try:
            q = checkpoint_quality(model, task, batches)
        except (RuntimeError, IndexError) as exc:
            err = batch_error(exc, batches[0])
            raise type(err)(f"{err} (checking the checkpoints on training rows; is it that {_fixes(cfg, task.kind)}?)") \
                from exc
        entry.update({f"sample_{k}": round(v, 6) for k, v in q.items() if k in ("accuracy", "loss")})
        problem = verdict(cfg, task.kind, str(file), q, rows)
        if problem and cfg.model.check_trained and id(entry) in finals:
            raise DataError(problem + alternatives(cfg, model, task, train.select(range(rows))))
        if problem:
            why = "model.check_trained is false" if not cfg.model.check_trained else "an earlier checkpoint of a run " \
                "whose last one looks trained"
            logger.warning("%s (%s: going on)", problem, why)


def alternatives(cfg: RunConfig, model: nn.Module, task: Any, sample: Any) -> str:
    """`` With data.image_scale: 255 it scores ...``: the built-in image collate's other scale and
    layout settings under which the checkpoint looks trained (empty when none does, or for
    families without the built-in image collate)."""
    from dataclasses import replace

    d = cfg.data
    if cfg.model.family != "user" or d.collate:
        return ""
    tries = [("image_scale", v) for v in ("auto", "none", 255.0) if v != d.image_scale]
    tries += [("image_layout", v) for v in ("auto", "HWC", "CHW", "stored") if v != d.image_layout]
    found = []
    for key, value in tries:
        other = replace(cfg, data=replace(d, **{key: value}))
        try:
            batches = [b for _, b in iter_batches(sample, family_for(other).collate(other), 64)]
            q = checkpoint_quality(model, task, batches)
        except Exception:  # noqa: BLE001 - a setting the data or the model cannot take is simply not a candidate
            continue
        if verdict(other, task.kind, "", q, len(sample)) is None:
            found.append(f"data.{key}: {value} gives " + (f"accuracy {q['accuracy']:.3f}, " if "accuracy" in q else "")
                         + f"mean loss {q['loss']:.3g}")
    return f". Settings under which it looks trained: {'; '.join(found)}" if found else ""


__all__ = ["NEAR_CHANCE", "NEAR_UNIFORM", "SAMPLE_ROWS", "alternatives", "check_inputs", "verdict"]
