"""Causal language models: the output function and batch helpers (docs/methods.md section 1).

Output function (what is attributed). For a token sequence ``x_0 .. x_{T-1}`` with a 0/1 loss
mask ``m_t`` marking the *completion* tokens,

    f(theta, z) = sum_{t >= 1} m_t log p_theta(x_t | x_{<t})          (reduction "sum")

that is minus the summed token cross-entropy of the completion given its prompt (the
completion's log-probability), or the same divided by ``sum_t m_t`` (reduction "mean"). The
reduction is recorded in the task name. ``Q = 1`` (docs/methods.md: Q is 1 for causal LMs). A
training sequence is a "completion" with an empty prompt: every position but the first (which
nothing predicts) is scored, so ``f`` of a training example is minus its training loss (times
its length). Sign: a score > 0 means training on that sequence *raises* the completion's
log-probability, i.e. lowers its loss.

This module holds :class:`LMTask`, :func:`completion_log_prob` and the batch helpers
(:func:`lm_collate`, :func:`real_token_mask`, :func:`lm_representation_inputs`). The demo
character-level GPT-2, its corpus helpers and its training recipe belong to the ``causal-lm``
family (``pipelines/families/chargpt.py``).

Per-example gradients run through :func:`tda.gradients.per_example.per_example_grads` (``vmap(grad(f))``
over ``functional_call``). The demo model is built with ``attn_implementation="eager"``: the SDPA
kernel also works under vmap but only through functorch's slow per-example fallback (with a
warning), and eager attention is plain batched matmuls. Dropout is 0 and the KV cache is off
(``use_cache=False``), so a call with ``input_ids`` alone is a pure function of the weights.

Sequences are right-padded to a fixed length (causal attention means padding on the right never
affects earlier positions) and padding is excluded by the loss mask, so no attention mask is
needed and the model is called with one positional argument, as ``functional_call`` requires.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from tda.errors import ConfigError, DataError, ShapeError
from tda.models.tasks import Batch, ModelCall, Task

_REDUCTIONS = ("sum", "mean")


# ------------------------------------------------------------------------------ batch helpers
def lm_collate(rows: Mapping[str, object]) -> dict[str, Tensor]:
    """Rows -> ``{"input_ids": (B, T) int64, "loss_mask": (B, T) float32}``."""
    for key in ("input_ids", "loss_mask"):
        if key not in rows:
            raise DataError(f"LM rows need an {key!r} column (have {sorted(rows)}); build them with "
                            "lm_sequences or completion_examples")
    return {"input_ids": torch.from_numpy(np.array(rows["input_ids"], dtype=np.int64)),
            "loss_mask": torch.from_numpy(np.array(rows["loss_mask"], dtype=np.float32))}


def real_token_mask(loss_mask: Tensor) -> Tensor:
    """(B, T) 1 at the positions up to each row's last scored token, 0 on the right padding
    after it (every position of a training sequence; prompt and completion of a query)."""
    pos = torch.arange(loss_mask.shape[1], device=loss_mask.device)  # (T,)
    last = ((loss_mask != 0).long() * pos).max(dim=1).values  # (B,)
    return (pos[None, :] <= last[:, None]).long()


def lm_representation_inputs(batch: Mapping[str, Tensor], ids: np.ndarray) -> list[tuple[Tensor, Tensor]]:
    """Representation inputs of collated LM rows: ``input_ids`` with the mask of real tokens
    (for :class:`tda.featurizers.representations.RepresentationFeaturizer`: mean over non-pad tokens)."""
    return [(batch["input_ids"], real_token_mask(batch["loss_mask"]))]


# ----------------------------------------------------------------------------- output function
def completion_log_prob(logits: Tensor, input_ids: Tensor, loss_mask: Tensor, reduction: str = "sum") -> Tensor:
    """``sum_t m_t log softmax(logits_{t-1})[x_t]`` per sequence (or its mean over masked tokens).

    Args:
        logits: (B, T, V) next-token scores. input_ids: (B, T). loss_mask: (B, T), position 0
            is ignored (nothing predicts it).
        reduction: ``"sum"`` (log-probability of the completion) or ``"mean"``.

    Returns:
        (B,) in the dtype of ``logits``.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ShapeError(f"need logits (B, T, V), input_ids and loss_mask (B, T); got "
                         f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(loss_mask.shape)}")
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V) predicts tokens 1..T-1
    target = logp.gather(2, input_ids[:, 1:].long().unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    weights = loss_mask[:, 1:].to(target.dtype)  # (B, T-1)
    total = (target * weights).sum(dim=1)  # (B,)
    if reduction == "sum":
        return total
    return total / weights.sum(dim=1).clamp_min(1.0)


def _logits(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ShapeError(f"the model returned a {type(output).__name__}; an LM must return logits")


class LMTask(Task):
    """Causal LM output ``f`` = log-probability of the masked (completion) tokens; ``Q = 1``.

    Args:
        reduction: ``"sum"`` (default: minus the summed token loss) or ``"mean"`` (minus the
            mean token loss); recorded in :attr:`name`.
    """

    def __init__(self, reduction: str = "sum") -> None:
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"LM reduction {reduction!r} is unknown; use one of {_REDUCTIONS}")
        self.reduction = reduction
        self.name = f"causal-lm-logprob-{reduction}"

    kind = "causal-lm"

    def _logits(self, model: ModelCall, batch: Batch) -> Tensor:
        for key in ("input_ids", "loss_mask"):
            if key not in batch:
                raise ShapeError(f"batch has no {key!r} entry (has {sorted(batch)}); collate LM rows "
                                 "with tda.models.lm.lm_collate")
        return _logits(model(batch["input_ids"]))

    def output(self, model: ModelCall, batch: Batch) -> Tensor:
        logits = self._logits(model, batch)
        return completion_log_prob(logits, batch["input_ids"], batch["loss_mask"], self.reduction)

    def example_loss(self, model: ModelCall, batch: Batch) -> Tensor:
        """Mean next-token loss of each sequence's scored tokens, (B,)."""
        logits = self._logits(model, batch)
        return -completion_log_prob(logits, batch["input_ids"], batch["loss_mask"], "mean")


__all__ = [
    "LMTask", "completion_log_prob", "lm_collate", "lm_representation_inputs", "real_token_mask",
]
