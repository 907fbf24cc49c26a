"""The demo character-level GPT-2 of the ``causal-lm`` family and its training recipe (moved
from ``tda/models/lm.py``; the output function and batch helpers stay in :mod:`tda.models.lm`).

Corpus helpers: :func:`load_text`, :class:`CharVocab`, fixed-length training sequences
(:func:`lm_sequences`), "completion given prompt" queries (:func:`completion_examples`) and
:func:`dataset_tokens`. The model: :class:`GPTSpec` and :func:`build_gpt2` (a ``GPT2LMHeadModel``
with eager attention, no dropout, no KV cache: a pure function of the weights under
``functional_call``, see :mod:`tda.models.lm`). The recipe: :func:`train_lm` (AdamW, warm-up and cosine
decay, :class:`LMTrainResult`), :func:`lm_loss` and :func:`generate`.
"""

from __future__ import annotations

import json
import gzip
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.errors import ConfigError, DataError, MissingDependencyError, NonFiniteError
from tda.models.lm import _logits, lm_collate

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- text and vocabulary
def load_text(path: str | Path) -> str:
    """A UTF-8 text corpus (e.g. Tiny Shakespeare's ``input.txt``).

    Raises:
        DataError: the file is missing or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"text corpus {path} not found; point data.root / the path argument at the folder "
            "or file holding it (Tiny Shakespeare ships as shared/data/tinyshakespeare/input.txt)"
        )
    text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text(encoding="utf-8")
    if not text:
        raise DataError(f"text corpus {path} is empty")
    return text


@dataclass(frozen=True)
class CharVocab:
    """Character-level vocabulary: token id = position of the character in ``chars``."""

    chars: str

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise DataError("a vocabulary needs at least one character and no duplicates")

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        """The sorted set of characters of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (len(text),) int64. Raises DataError on characters outside the vocabulary."""
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise DataError(f"characters {unknown[:10]} are not in the vocabulary; use text "
                            "made of the training corpus' characters")
        return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids: Sequence[int] | np.ndarray | Tensor) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars})

    @classmethod
    def from_json(cls, raw: str) -> "CharVocab":
        return cls(json.loads(raw)["chars"])


# --------------------------------------------------------------------------------------- data
def _sequence_table(ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray):
    import datasets
    import pyarrow as pa

    n, t = tokens.shape
    table = pa.table({
        "id": pa.array(ids.astype(np.int64)),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1).astype(np.int64)), t),
        "loss_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1).astype(np.int8)), t),
    })
    return datasets.Dataset(table)


def lm_sequences(
    text: str, vocab: CharVocab, seq_len: int, n: int | None = None, start: int = 0,
    stride: int | None = None,
):
    """Fixed-length training sequences cut from ``text``, as a ``datasets.Dataset``.

    Sequence i is ``text[start + i*stride : start + i*stride + seq_len]`` (stride defaults to
    seq_len: non-overlapping). Columns: ``id`` (int64, = i), ``input_ids`` (seq_len int64),
    ``loss_mask`` (seq_len int8: 1 everywhere but position 0, which nothing predicts).

    Args:
        text: corpus. vocab: its vocabulary. seq_len: tokens per sequence (>= 2).
        n: number of sequences (default: as many as fit). start: first character used.
        stride: characters between sequence starts.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2 or stride < 1 or start < 0:
        raise ConfigError(f"need seq_len >= 2, stride >= 1, start >= 0; got {seq_len}, {stride}, {start}")
    fit = (len(text) - start - seq_len) // stride + 1
    if fit < 1:
        raise DataError(f"the text from character {start} is shorter than one sequence of {seq_len}")
    if n is None:
        n = fit
    if not 1 <= n <= fit:
        raise DataError(f"asked for {n} sequences of {seq_len} characters, the text holds {fit}")
    end = start + (n - 1) * stride + seq_len
    tokens = vocab.encode(text[start:end])
    offsets = np.arange(n)[:, None] * stride + np.arange(seq_len)[None, :]  # (n, T)
    mask = np.ones((n, seq_len), dtype=np.int8)
    mask[:, 0] = 0
    return _sequence_table(np.arange(n), tokens[offsets], mask)


def completion_examples(
    vocab: CharVocab, pairs: Sequence[tuple[str, str]], seq_len: int, ids: Sequence[int] | None = None,
):
    """Query examples "completion given prompt", right-padded to ``seq_len``.

    ``f`` of such an example is the log-probability of ``completion`` given ``prompt`` (see the
    module docstring): ``loss_mask`` is 1 exactly on the completion's tokens. A prompt too long
    to fit is cut from the left (the model's context window is ``seq_len``).

    Args:
        vocab: the training vocabulary. pairs: ``(prompt, completion)`` strings.
        seq_len: the model's context length. ids: example ids (default 0..m-1).

    Raises:
        DataError: empty completion, or a completion that leaves no room for a prompt token.
    """
    if not pairs:
        raise DataError("no (prompt, completion) pairs given")
    tokens = np.zeros((len(pairs), seq_len), dtype=np.int64)  # pad with id 0, masked out
    mask = np.zeros((len(pairs), seq_len), dtype=np.int8)
    for row, (prompt, completion) in enumerate(pairs):
        if not completion or len(completion) >= seq_len or not prompt:
            raise DataError(
                f"pair {row}: need a non-empty prompt and a completion of 1..{seq_len - 1} "
                f"characters, got {len(prompt)} and {len(completion)}"
            )
        prompt = prompt[-(seq_len - len(completion)):]
        seq = vocab.encode(prompt + completion)
        tokens[row, : len(seq)] = seq
        mask[row, len(prompt): len(seq)] = 1
    ids_arr = np.arange(len(pairs)) if ids is None else np.asarray(ids, dtype=np.int64)
    return _sequence_table(ids_arr, tokens, mask)


# ------------------------------------------------------------------------------------ the model
@dataclass
class GPTSpec:
    """A small GPT-2 configuration (char-level defaults train in minutes on 2 cores)."""

    vocab_size: int = 65
    seq_len: int = 64  # context length (n_positions)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    tie_embeddings: bool = False  # untied: every Linear/Conv1D weight belongs to one module

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


def build_gpt2(spec: GPTSpec, seed: int | None = None) -> nn.Module:
    """A ``GPT2LMHeadModel`` from ``spec`` (random init; nothing is downloaded), in eval mode.

    Eager attention (vmap-friendly), no dropout, no KV cache. ``seed`` seeds the init.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("language models need transformers: pip install 'transformers>=5'") from exc
    config = GPT2Config(
        vocab_size=spec.vocab_size, n_positions=spec.seq_len, n_embd=spec.n_embd,
        n_layer=spec.n_layer, n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=spec.tie_embeddings, attn_implementation="eager",
    )
    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


# ------------------------------------------------------------------------------------ training
@dataclass
class LMTrainResult:
    """What :func:`train_lm` recorded.

    Attributes:
        checkpoints: ``{"step", "lr", "loss"}`` per saved checkpoint; ``lr`` is the mean
            learning rate over the steps since the previous checkpoint (TracIn's eta_c).
        losses: training loss per step. seconds: wall time.
    """

    checkpoints: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine to lr/10


def train_lm(
    model: nn.Module,
    tokens: Tensor,
    steps: int = 1000,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    warmup: int = 50,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[int, nn.Module, dict], None] | None = None,
    weight_decay: float = 0.01,
    weights: Tensor | None = None,
) -> LMTrainResult:
    """Train a causal LM on fixed-length sequences with AdamW and a warmup + cosine schedule.

    Deterministic given ``seed``: batches are drawn (with replacement across steps, without
    within a step) by a seeded ``torch.Generator``.

    Args:
        model: a model returning logits for ``input_ids`` (e.g. :func:`build_gpt2`).
        tokens: (n, T) int64 training sequences (every position but the first is a target).
        steps: optimiser steps. checkpoint_every: save every this many steps (the last step is
            always a checkpoint). on_checkpoint: ``on_checkpoint(index, model, record)``.
        weights: (n,) per-sequence data weights (None: ones). A step minimises ``sum_b w_b
            loss_b / B`` with ``loss_b`` the sequence's mean token loss, so a zero drops a
            sequence while the batches stay the full run's (the small-drop protocol).

    Returns:
        :class:`LMTrainResult` with one record per checkpoint.
    """
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise DataError(f"training tokens must be (n >= 1, T >= 2), got {tuple(tokens.shape)}")
    if weights is not None and tuple(weights.shape) != (tokens.shape[0],):
        raise DataError(f"weights must have one value per training sequence, shape ({tokens.shape[0]},), got "
                        f"{tuple(weights.shape)}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"need steps >= 1, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    every = checkpoint_every or steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    result, lr_sum, lr_count, start = LMTrainResult(), 0.0, 0, time.perf_counter()
    model.train()
    for step in range(steps):
        step_lr = _lr_at(step, steps, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = step_lr
        idx = torch.randperm(tokens.shape[0], generator=gen)[:batch_size]
        batch = tokens[idx]  # (B, T)
        logits = _logits(model(batch))  # (B, T, V)
        if weights is None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        else:
            per = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                              reduction="none").reshape(len(idx), -1).mean(dim=1)
            loss = (weights[idx].to(per.dtype) * per).sum() / len(idx)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"training diverged: the LM loss became {loss.item()} at step {step} (train.lr is "
                                 f"{lr:g}); lower train.lr and rerun")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        result.losses.append(loss.item())
        lr_sum, lr_count = lr_sum + step_lr, lr_count + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            record = {"step": step + 1, "lr": lr_sum / lr_count,
                      "loss": float(np.mean(result.losses[-min(every, 50):]))}
            lr_sum, lr_count = 0.0, 0
            model.eval()
            if on_checkpoint is not None:
                on_checkpoint(len(result.checkpoints), model, record)
            model.train()
            result.checkpoints.append(record)
            logger.info("LM step %d loss %.3f", step + 1, record["loss"])
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def lm_loss(model: nn.Module, tokens: Tensor, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy of ``model`` on (n, T) sequences (nats per token)."""
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, tokens.shape[0], batch_size):
        batch = tokens[lo: lo + batch_size]
        logits = _logits(model(batch))
        total += float(nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def sequence_losses(model: nn.Module, tokens: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Per (n, T) sequence: mean next-token cross-entropy (nats) and mean probability of the
    actual next token, both float64 (n,)."""
    model.eval()
    losses, probs = [], []
    for lo in range(0, tokens.shape[0], batch_size):
        batch = tokens[lo: lo + batch_size]
        logp = torch.log_softmax(_logits(model(batch))[:, :-1].double(), dim=-1)
        target = logp.gather(2, batch[:, 1:].unsqueeze(2)).squeeze(2)  # (b, T-1)
        losses.append(-target.mean(1))
        probs.append(target.exp().mean(1))
    return torch.cat(losses), torch.cat(probs)


@torch.no_grad()
def generate(model: nn.Module, vocab: CharVocab, prompt: str, length: int, seq_len: int,
             temperature: float = 0.0, seed: int = 0) -> str:
    """Greedy (temperature 0) or sampled continuation of ``prompt`` (for demos and checks)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.from_numpy(vocab.encode(prompt))[None]  # (1, t)
    for _ in range(length):
        logits = _logits(model(ids[:, -seq_len:]))[0, -1]  # (V,)
        if temperature <= 0:
            nxt = logits.argmax()
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[0]
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return vocab.decode(ids[0, -length:])


def dataset_tokens(dataset) -> Tensor:
    """The ``input_ids`` column of an LM dataset as an (n, T) int64 tensor."""
    from tda.data.loading import arrow_columns

    return lm_collate(arrow_columns(dataset.with_format("arrow")[:]))["input_ids"]


__all__ = [
    "CharVocab", "GPTSpec", "LMTrainResult", "build_gpt2", "completion_examples", "dataset_tokens", "generate",
    "sequence_losses",
    "lm_loss", "lm_sequences", "load_text", "train_lm",
]
