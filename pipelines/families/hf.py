"""The ``hf`` family: a Hugging Face transformers model from a ``save_pretrained`` folder.

``model.hf`` names the folder (class from its config's ``architectures``, or
``model.hf_class``); its own weights are the checkpoint unless ``model.checkpoints`` lists
others (``.safetensors`` / ``.pt`` state dicts or more ``save_pretrained`` folders). The
tokenizer comes from the same folder or ``data.tokenizer`` (a ``save_pretrained`` folder, or
``vocab.json`` + ``merges.txt`` of GPT-2). Data are files, as in the ``user`` family.

- ``*ForSequenceClassification``: f = the margin of the true label (``data.label_column``) on
  ``data.text_column`` (:class:`tda.models.hf.HFClassificationTask`, :class:`tda.models.hf.HFTextCollate`);
- ``*ForCausalLM`` / ``*LMHeadModel``: f = log p(completion | prompt), rows with ``prompt`` and
  ``completion`` columns, or whole texts in ``data.text_column`` (every token but the first
  scored; training stories, say): :class:`tda.models.hf.HFCausalLMTask`.

Padding is trimmed per example and models whose code cannot run under ``vmap`` fall back to a
per-example autograd pass (:mod:`tda.models.hf`, :class:`tda.featurizers.gradient.Featurizer`); the path taken is
logged. Features are gradients (dense or factored projection); retraining (``tda validate``,
curate, unlearn) fine-tunes from the folder's weights with the generic recipe
(``train.init: pretrained``, :mod:`.capabilities`) or runs ``train.factory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from tda.errors import ConfigError
from tda.models.tasks import Task

from pipelines.families.registry import register_family
from pipelines.families.user import UserFamily, task_from_config

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class HFFamily(UserFamily):
    """A transformers model from a folder; text classification or causal language modelling."""

    name = "hf"
    feature_kinds = ("gradients",)

    def check(self, cfg: RunConfig) -> None:
        folder = Path(cfg.model.hf or "")
        if not cfg.model.hf or not (folder / "config.json").is_file():
            raise ConfigError(f"model.hf must name a save_pretrained folder (with config.json); got {cfg.model.hf!r}")
        if cfg.data.train_path is None or cfg.data.query_path is None:
            raise ConfigError("the 'hf' family reads your data from files: set data.train_path and data.query_path")
        self.options(cfg)

    def default_checkpoints(self, cfg: RunConfig) -> list[str]:
        """The folder's own weights."""
        folder = Path(cfg.model.hf)
        return [str(folder / f) for f in WEIGHT_FILES if (folder / f).is_file()][:1] or [str(folder)]

    def build_model(self, cfg: RunConfig) -> nn.Module:
        from tda.models.hf import load_hf_model

        return load_hf_model(cfg.model.hf, cfg.model.hf_class)

    def fresh_model(self, cfg: RunConfig) -> nn.Module:
        """A retraining's start (``train.init``): the folder's weights (``pretrained``, the default:
        fine-tuning) or a fresh seeded initialisation of the same config (``scratch``)."""
        model = self.build_model(cfg)
        if cfg.train.init == "scratch":
            return type(model)(model.config)
        return model

    def is_lm(self, cfg: RunConfig) -> bool:
        from transformers import AutoConfig

        name = cfg.model.hf_class or (AutoConfig.from_pretrained(cfg.model.hf, local_files_only=True).architectures
                                      or [""])[0]
        return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")

    def task(self, cfg: RunConfig) -> Task:
        from tda.models.hf import HFCausalLMTask, HFClassificationTask

        if cfg.model.task in (None, "classification", "causal-lm"):
            lm = cfg.model.task == "causal-lm" or (cfg.model.task is None and self.is_lm(cfg))
            return HFCausalLMTask() if lm else HFClassificationTask()
        return task_from_config(cfg)

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        from tda.models.hf import HFCausalLMCollate, HFTextCollate

        d = cfg.data
        if d.collate:
            return super().collate(cfg)
        tokenizer = d.tokenizer or cfg.model.hf
        if self.is_lm(cfg):
            return LMRowsCollate(HFCausalLMCollate(tokenizer, "prompt", "completion", d.max_length),
                                 HFCausalLMCollate(tokenizer, None, d.text_column, d.max_length))
        return HFTextCollate(tokenizer, d.text_column, d.label_column, d.max_length)


class LMRowsCollate:
    """Prompt/completion rows with the first collate, whole texts with the second (picklable)."""

    def __init__(self, pairs: Any, texts: Any) -> None:
        self.pairs, self.texts = pairs, texts

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        return self.pairs(rows) if "prompt" in rows and "completion" in rows else self.texts(rows)


register_family(HFFamily())
