"""Hugging Face transformers models: tasks, loading, collates (all offline).

Attribute a fine-tuned classifier saved with ``save_pretrained`` (model and tokenizer in one
folder; every checkpoint a ``save_pretrained`` folder, a ``.safetensors`` file or a state dict)::

    import datasets
    import tda
    from tda.models.hf import HFClassificationTask, HFTextCollate, load_hf_model

    folder = "runs/sst2-bert/final"  # model.save_pretrained(folder); tokenizer.save_pretrained(folder)
    train = datasets.Dataset.from_dict({"text": train_texts, "label": train_labels})
    test = datasets.Dataset.from_dict({"text": test_texts, "label": test_labels})
    attr = tda.Attributor(load_hf_model(folder), ["runs/sst2-bert/step-500", folder],
                          collate=HFTextCollate(folder), task=HFClassificationTask(), k=1024, batch_size=32)
    scores = attr.fit(train).scores(test)  # (n_test, n_train); > 0: the training text raises the margin
    top = attr.top_k(test, k=10)           # proponents and opponents per test text

A causal LM: ``HFCausalLMCollate(folder)`` (``prompt``, ``completion`` columns) and
``HFCausalLMTask()``; :func:`hf_task_for` picks the task from the model's class.

Padding: the tasks split a padded batch into groups of equal real length and trim them
(:func:`trim_padding`), so each example runs exactly as it would alone, unpadded, whatever the
model does with padding (GPT-2 classification pools the last token). A trimmed group's mask (all
ones) is not passed, so transformers builds none: its mask builders are what usually stops
``torch.func.vmap``. Models that still cannot run under vmap (GPT-2 classification with a
``pad_token_id``: its padding check calls ``.item()``) are switched by
:class:`tda.featurizers.gradient.Featurizer` to one autograd pass per example, with a logged warning.

Batch keys (all int64, right-padded to the batch's longest row): :class:`HFTextCollate` gives
``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them), ``labels``;
:class:`HFCausalLMCollate` gives ``input_ids``, ``attention_mask``, ``loss_mask``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from tda.errors import CheckpointError, ConfigError, DataError, MissingDependencyError, ShapeError
from tda.models.lm import completion_log_prob
from tda.models.tasks import Batch, MarginTask, ModelCall, Task

logger = logging.getLogger(__name__)

HF_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
GPT2_EOS = "<|endoftext|>"


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("Hugging Face models need transformers: pip install 'transformers>=5'") from exc
    return transformers


def hf_logits(output: Any) -> Tensor:
    """The logits of a model's output: a ``ModelOutput``'s ``.logits``, or a plain tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ShapeError(f"the model returned a {type(output).__name__} without a .logits tensor; an HF task needs a "
                     "model with a head (e.g. *ForSequenceClassification, *ForCausalLM), not a base model")


# ----------------------------------------------------------------------------------- padding
def _span(row: Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` of the real tokens of one mask row when they are contiguous, else None."""
    idx = torch.nonzero(row).flatten()
    if idx.numel() == 0:
        raise DataError("an example has no real tokens (its attention_mask is all 0); drop empty texts")
    start, stop = int(idx[0]), int(idx[-1]) + 1
    return (start, stop) if stop - start == idx.numel() else None


def trim_padding(batch: Batch, mask_key: str = "attention_mask") -> list[tuple[Tensor, Batch]]:
    """Groups of examples with the same real tokens' span, trimmed to it (left or right padding).

    Every entry whose first two dimensions are the mask's ``(B, T)`` is sliced to the span; the
    others (e.g. class labels) are only indexed. A trimmed group drops ``mask_key`` (it would be
    all ones). A row whose mask has holes (packed sequences) is kept whole, with its mask.

    Returns:
        ``(rows, sub_batch)`` pairs covering every example once (see
        :meth:`tda.models.tasks.Task.example_groups`); without ``mask_key``, the batch as one group.
    """
    first = next(iter(batch.values()))
    mask = batch.get(mask_key)
    if mask is None or mask.ndim != 2:
        return [(torch.arange(first.shape[0], device=first.device), batch)]
    spans: dict[tuple[int, int] | None, list[int]] = {}
    for i, row in enumerate(mask.detach().cpu() != 0):
        spans.setdefault(_span(row), []).append(i)
    shape = tuple(mask.shape)
    groups = []
    for span, rows in spans.items():
        idx = torch.tensor(rows, dtype=torch.long, device=first.device)
        sub = {}
        for key, value in batch.items():
            value = value[idx]
            aligned = span is not None and value.ndim >= 2 and tuple(value.shape[:2]) == (len(rows), shape[1])
            sub[key] = value[:, span[0]: span[1]] if aligned else value
        if span is not None:
            sub.pop(mask_key)
        groups.append((idx, sub))
    return groups


def _call(model: ModelCall, batch: Batch, keys: Sequence[str]) -> Tensor:
    if "input_ids" not in batch:
        raise ShapeError(f"batch has no 'input_ids' entry (has {sorted(batch)}); collate text with "
                         "tda.models.hf.HFTextCollate or HFCausalLMCollate")
    try:
        return hf_logits(model(**{k: batch[k] for k in keys if k in batch}))
    except ValueError as exc:
        if "padding token" not in str(exc):
            raise
        raise ConfigError(f"{exc}; set model.config.pad_token_id = tokenizer.pad_token_id before featurizing "
                          "(a batched pass over padded rows needs it)") from exc


class HFClassificationTask(MarginTask):
    """Margin output of a transformers sequence classifier, ``Q = 1 - p_y``.

    The model gets the ``input_keys`` found in the batch as keywords; its ``.logits`` (B, C) give
    ``f = logit_y - logsumexp_{j != y} logit_j`` (:func:`tda.models.tasks.classification_margin`).

    Args:
        label_key: the labels' entry, default ``"labels"`` (the transformers name, what
            :class:`HFTextCollate` returns).
        input_keys: the model's keyword inputs (absent ones are skipped).
    """

    name = "hf-classification-margin"

    def __init__(self, label_key: str = "labels", input_keys: Sequence[str] = HF_INPUT_KEYS) -> None:
        self.label_key, self.input_keys = label_key, tuple(input_keys)

    def _logits(self, model: ModelCall, batch: Batch) -> Tensor:
        if self.label_key not in batch:
            raise ShapeError(f"batch has no {self.label_key!r} entry (has {sorted(batch)}); pass "
                             "HFClassificationTask(label_key=...) naming the labels")
        return _call(model, batch, self.input_keys)

    def example_groups(self, batch: Batch) -> list[tuple[Tensor, Batch]]:
        return trim_padding(batch)


class HFCausalLMTask(Task):
    """``f = log p(completion | prompt)``: the summed (or mean) log-probability of the scored tokens; ``Q = 1``.

    Scored tokens: ``batch[mask_key]`` != 0, else ``batch["labels"]`` != -100 (transformers'
    convention, aligned with ``input_ids``). Position 0 is never scored.

    Args:
        reduction: ``"sum"`` or ``"mean"`` (see :func:`tda.models.lm.completion_log_prob`).
        mask_key: the scored-token mask's entry. input_keys: the model's keyword inputs.
    """

    def __init__(self, reduction: str = "sum", mask_key: str = "loss_mask",
                 input_keys: Sequence[str] = ("input_ids", "attention_mask")) -> None:
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"LM reduction {reduction!r} is unknown; use 'sum' or 'mean'")
        self.reduction, self.mask_key, self.input_keys = reduction, mask_key, tuple(input_keys)
        self.name = f"hf-causal-lm-logprob-{reduction}"

    kind = "causal-lm"

    def _scored(self, batch: Batch) -> Tensor:
        if self.mask_key in batch:
            return batch[self.mask_key]
        if "labels" in batch and batch["labels"].ndim == 2:
            return (batch["labels"] != -100).long()
        raise ShapeError(f"batch has neither {self.mask_key!r} nor (B, T) 'labels' (has {sorted(batch)}); "
                         "collate prompt/completion rows with tda.models.hf.HFCausalLMCollate")

    def output(self, model: ModelCall, batch: Batch) -> Tensor:
        scored = self._scored(batch)
        return completion_log_prob(_call(model, batch, self.input_keys), batch["input_ids"], scored, self.reduction)

    def example_loss(self, model: ModelCall, batch: Batch) -> Tensor:
        """Mean next-token loss of each sequence's scored tokens, (B,)."""
        scored = self._scored(batch)
        return -completion_log_prob(_call(model, batch, self.input_keys), batch["input_ids"], scored, "mean")

    def example_groups(self, batch: Batch) -> list[tuple[Tensor, Batch]]:
        return trim_padding(batch)


def hf_task_for(model: nn.Module) -> Task:
    """The task for a transformers model's head: classification or causal LM, by class name."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return HFClassificationTask()
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return HFCausalLMTask()
    raise ConfigError(f"no default task for {cls}; pass task=HFClassificationTask() or HFCausalLMTask(), "
                      "or your own tda.models.tasks.Task")


# ----------------------------------------------------------------------------------- loading
def _model_class(name_or_class: Any, config: Any, folder: Path) -> type:
    transformers = _transformers()
    if name_or_class is None:
        names = getattr(config, "architectures", None) or []
        if not names:
            raise ConfigError(f"{folder}/config.json names no architectures; pass model_class, e.g. "
                              "'BertForSequenceClassification'")
        name_or_class = names[0]
    if isinstance(name_or_class, str):
        cls = getattr(transformers, name_or_class, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise ConfigError(f"model_class {name_or_class!r} is not a transformers model class; use a name like "
                              f"'GPT2ForSequenceClassification' (the folder's config says {config.architectures})")
        name_or_class = cls
    wanted = getattr(name_or_class, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        raise ConfigError(f"{name_or_class.__name__} needs a {wanted.__name__}, but {folder} holds a "
                          f"{type(config).__name__}; use one of its architectures {config.architectures}")
    return name_or_class


def load_hf_model(folder: str | Path, model_class: str | type | None = None,
                  attn_implementation: str | None = "eager") -> nn.Module:
    """A transformers model from a ``save_pretrained`` folder, offline, in eval mode.

    Args:
        folder: holds ``config.json`` and the weights (``model.safetensors``).
        model_class: a class or its name in ``transformers`` (e.g. ``"GPT2ForSequenceClassification"``);
            default the first of the config's ``architectures``.
        attn_implementation: default ``"eager"``: vmap batches its matmuls and softmax but runs
            fused SDPA kernels one example at a time (eager: ~1.5x faster vmapped gradients on
            CPU, same outputs up to rounding). ``None`` keeps the config's.

    Raises:
        ConfigError: no ``config.json``, or the class is unknown or does not fit the config.
        CheckpointError: the weights cannot be read, or some of the model's weights are not
            in them (they would be random).
    """
    transformers = _transformers()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is not a save_pretrained folder (no config.json); point at the folder "
                          "model.save_pretrained wrote")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder}/config.json cannot be read: {str(exc).splitlines()[0]}; save the model again "
                          "with save_pretrained") from exc
    cls = _model_class(model_class, config, folder)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model, info = cls.from_pretrained(folder, config=config, local_files_only=True, output_loading_info=True,
                                          **extra)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{cls.__name__} cannot load the weights in {folder}: {str(exc).splitlines()[0]}; "
                              "save the model with save_pretrained into that folder") from exc
    missing = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if missing:
        raise CheckpointError(f"{folder} lacks or mismatches {len(missing)} weight(s) of {cls.__name__} (they would "
                              f"be random): {missing[:5]}; load it with the class it was saved from "
                              f"({config.architectures})")
    if info.get("unexpected_keys"):
        logger.warning("%s ignores %d weight(s) of %s, e.g. %s", cls.__name__, len(info["unexpected_keys"]),
                       folder, sorted(info["unexpected_keys"])[:3])
    logger.info("loaded %s from %s", cls.__name__, folder)
    return model.eval()


def _with_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_gpt2_tokenizer(folder: str | Path) -> Any:
    """The GPT-2 byte-level BPE tokenizer from ``vocab.json`` and ``merges.txt`` (pad = eos).

    ``ByteLevelBPETokenizer``'s pipeline as a plain ``tokenizers.Tokenizer`` (canonical GPT-2 ids;
    the wrapper class breaks truncation, ``GPT2TokenizerFast(vocab_file=...)`` gives empty ids in
    transformers 5) in ``PreTrainedTokenizerFast``. No ``token_type_ids`` (GPT-2 would embed them).
    """
    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ConfigError(f"{folder} needs vocab.json and merges.txt for a GPT-2 tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    bpe = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=GPT2_EOS, bos_token=GPT2_EOS, unk_token=GPT2_EOS,
        model_input_names=["input_ids", "attention_mask"])
    return _with_pad(fast)


def load_hf_tokenizer(folder: str | Path) -> Any:
    """A tokenizer from a folder, offline: ``AutoTokenizer`` for ``save_pretrained`` folders, or
    :func:`load_gpt2_tokenizer` for bare ``vocab.json`` + ``merges.txt``. Pad token set to eos when missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {folder} does not exist; point at the folder tokenizer.save_pretrained "
                          "wrote (often the model's folder)")
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            return _with_pad(_transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}") from exc
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return load_gpt2_tokenizer(folder)
    raise ConfigError(f"{folder} holds no tokenizer (tokenizer.json / tokenizer_config.json, or vocab.json + "
                      "merges.txt); save one there with tokenizer.save_pretrained(folder)")


# ----------------------------------------------------------------------------------- collates
class _Tokenizing:
    """Holds a tokenizer, or its folder and loads it on first use (so it pickles light)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}")
        self.max_length = max_length
        self._source = str(tokenizer) if isinstance(tokenizer, (str, Path)) else None
        self._tokenizer = None if self._source else _with_pad(tokenizer)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_hf_tokenizer(self._source)
        return self._tokenizer

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._source:
            state["_tokenizer"] = None  # rebuilt from the folder where it is unpickled
        return state

    @staticmethod
    def _column(rows: Mapping[str, Any], name: str) -> list[str]:
        if name not in rows:
            raise DataError(f"rows have no {name!r} column (have {sorted(rows)}); name the text columns of the "
                            "data set in the collate")
        return [str(t) for t in rows[name]]


class HFTextCollate(_Tokenizing):
    """Text classification rows -> ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``.

    Args:
        tokenizer: a tokenizer folder (loaded lazily by :func:`load_hf_tokenizer`, and not
            pickled: workers load it again) or a tokenizer (its pad token is set to eos if unset).
        text_column: the text. label_column: integer class labels. text_pair_column: the second
            text of sentence-pair tasks (QNLI, ...), or None.
        max_length: texts are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Any, text_column: str = "text", label_column: str = "label",
                 max_length: int = 128, text_pair_column: str | None = None) -> None:
        super().__init__(tokenizer, max_length)
        self.text_column, self.label_column, self.text_pair_column = text_column, label_column, text_pair_column

    def __call__(self, rows: Mapping[str, Any]) -> dict[str, Tensor]:
        texts = self._column(rows, self.text_column)
        pairs = self._column(rows, self.text_pair_column) if self.text_pair_column else None
        if self.label_column not in rows:
            raise DataError(f"rows have no {self.label_column!r} column (have {sorted(rows)}); pass label_column")
        enc = self.tokenizer(texts, pairs, padding="longest", truncation=True, max_length=self.max_length,
                             padding_side="right", return_tensors="pt")
        out = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        try:
            out["labels"] = torch.as_tensor([int(v) for v in rows[self.label_column]], dtype=torch.int64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"labels in {self.label_column!r} must be integer class ids ({exc}); map names to ids "
                            "first, e.g. dataset.class_encode_column(...)") from exc
        return out


class HFCausalLMCollate(_Tokenizing):
    """Prompt/completion rows -> ``input_ids``, ``attention_mask``, ``loss_mask`` (1 on completion tokens).

    Prompt and completion are tokenized separately (no special tokens) and concatenated; a
    sequence over ``max_length`` loses prompt tokens from the left first (one is kept), then
    completion tokens from the right. ``prompt_column=None`` scores whole texts (e.g. training
    stories in ``completion_column="text"``); their first token is unscored (nothing predicts it).
    """

    def __init__(self, tokenizer: Any, prompt_column: str | None = "prompt", completion_column: str = "completion",
                 max_length: int = 128) -> None:
        super().__init__(tokenizer, max_length)
        self.prompt_column, self.completion_column = prompt_column, completion_column

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]

    def __call__(self, rows: Mapping[str, Any]) -> dict[str, Tensor]:
        completions = self._ids(self._column(rows, self.completion_column))
        prompts = self._ids(self._column(rows, self.prompt_column)) if self.prompt_column else [[]] * len(completions)
        if not all(completions):
            raise DataError(f"row {[bool(c) for c in completions].index(False)} has an empty completion; every "
                            "row needs completion tokens to score")
        over = [max(len(p) + len(c) - self.max_length, 0) for p, c in zip(prompts, completions)]
        cuts = [min(max(len(p) - 1, 0), o) for p, o in zip(prompts, over)]  # prompt tokens dropped from the left
        seqs = [(p[k:], c[: self.max_length - len(p) + k]) for p, c, k in zip(prompts, completions, cuts)]
        ids = torch.full((len(seqs), max(len(p) + len(c) for p, c in seqs)), self.tokenizer.pad_token_id)
        attention, scored = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (p, c) in enumerate(seqs):
            ids[i, : len(p) + len(c)] = torch.as_tensor(p + c, dtype=torch.int64)
            attention[i, : len(p) + len(c)], scored[i, len(p): len(p) + len(c)] = 1, 1
        return {"input_ids": ids.long(), "attention_mask": attention.long(), "loss_mask": scored.long()}


__all__ = ["HFCausalLMCollate", "HFCausalLMTask", "HFClassificationTask", "HFTextCollate", "HF_INPUT_KEYS",
           "hf_logits", "hf_task_for", "load_gpt2_tokenizer", "load_hf_model", "load_hf_tokenizer", "trim_padding"]
