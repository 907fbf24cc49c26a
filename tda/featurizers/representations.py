"""Hidden representations of a named module, for RepSim (docs/methods.md sections 1 and 5).

The representation output ``h(z)`` is the output of one named submodule, captured with a
forward hook and flattened per example to a vector: (B, H) stays as is, (B, T, H) sequences are
mean-pooled over non-pad tokens (over all T without an attention mask), any other shape
(B, ...) is flattened to (B, prod(...)). The forward pass stops as soon as the module has run,
so layers after it cost nothing.

:class:`RepresentationFeaturizer` has the interface of :class:`tda.featurizers.gradient.Featurizer`
(``featurize(state, checkpoint, batches)`` yielding ``(ids, feats (B, h), q (B,))``), so the
Attributor and the pipelines can store representations wherever they store gradient features;
``q`` is all ones (representations have no loss weight). Models whose inputs are not one
batch entry (a DDPM's ``(x_t, t)``, a padded text's mask) pass ``inputs``: a function of the
batch returning one or more ``(model input, attention mask)`` views, whose pooled
representations are averaged (e.g. over a seeded grid of diffusion timesteps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.errors import ConfigError, DataError, ShapeError
from tda.featurizers.gradient import StateDict, featurize_loop
from tda.gradients.per_example import check_finite, eval_mode
from tda.models.tasks import Batch

ModelInput = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
#: ``inputs(batch, ids)`` -> views ``[(model input, (B, T) attention mask or None), ...]``
InputViews = Callable[[Batch, np.ndarray], Sequence[tuple[ModelInput, Tensor | None]]]


class _Captured(Exception):
    """Raised from the hook to stop the forward pass once the module's output is captured."""


def find_module(model: nn.Module, module_name: str) -> nn.Module:
    """The submodule called ``module_name`` (as in ``model.named_modules()``).

    Raises:
        ConfigError: no such module; the message lists the available names.
    """
    modules = dict(model.named_modules())
    if module_name not in modules:
        names = [n for n in modules if n]
        shown = ", ".join(repr(n) for n in names[:40])
        if len(names) > 40:
            shown += f", ... ({len(names)} in all)"
        raise ConfigError(
            f"module {module_name!r} is not in the model; available module names: {shown}"
        )
    return modules[module_name]


def _first_tensor(output: Any, module_name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # e.g. transformer blocks returning (hidden, attention, ...)
    if hasattr(output, "last_hidden_state") and isinstance(output.last_hidden_state, Tensor):
        return output.last_hidden_state
    raise ShapeError(
        f"module {module_name!r} returns a {type(output).__name__}, not a tensor; choose a "
        "module whose output is a tensor (or a tuple whose first item is one)"
    )


def pool(output: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Flatten a module output to one float32 vector per example.

    Args:
        output: (B,), (B, H), (B, T, H) or (B, ...) module output.
        attention_mask: optional (B, T), nonzero for real tokens; used for 3-D outputs only.

    Returns:
        (B, h) float32: (B, H) as is; (B, T, H) averaged over non-pad tokens (over T without a
        mask; an all-pad row gives zeros); otherwise flattened to (B, prod(...)).
    """
    out = output.float()
    if out.ndim == 1:
        return out[:, None]  # (B, 1)
    if out.ndim == 3:
        b, t, _ = out.shape
        if attention_mask is None:
            return out.mean(dim=1)  # (B, H)
        if tuple(attention_mask.shape) != (b, t):
            raise ShapeError(
                f"attention mask has shape {tuple(attention_mask.shape)}, the module output "
                f"{tuple(out.shape)}; pass a (B, T) = ({b}, {t}) mask of the same batch"
            )
        mask = (attention_mask != 0).to(out.dtype).unsqueeze(-1)  # (B, T, 1)
        return (out * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, H)
    return out.reshape(out.shape[0], -1)  # (B, h)


def _call(model: nn.Module, batch_input: ModelInput) -> Any:
    if isinstance(batch_input, Tensor):
        return model(batch_input)
    if isinstance(batch_input, Mapping):
        return model(**batch_input)
    return model(*batch_input)


def _capture(model: nn.Module, module_name: str, batch_input: ModelInput, stop: bool) -> tuple[Tensor, Any]:
    """The first output of ``module_name`` and, unless ``stop``, the model's output (eval, no grad)."""
    module = find_module(model, module_name)
    captured: list[Tensor] = []

    def hook(_mod: nn.Module, _inp: Any, output: Any) -> None:
        if not captured:
            captured.append(_first_tensor(output, module_name))
        if stop:
            raise _Captured

    handle = module.register_forward_hook(hook)
    result = None
    try:
        with eval_mode(model), torch.no_grad():
            try:
                result = _call(model, batch_input)
            except _Captured:
                pass
    finally:
        handle.remove()
    if not captured:
        raise DataError(
            f"module {module_name!r} was not called by the model's forward pass; choose a "
            "module the forward actually runs"
        )
    return captured[0], result


def hidden_states(
    model: nn.Module,
    module_name: str,
    batch_input: ModelInput,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Representation ``h(z)`` of every example: the pooled output of ``module_name``.

    The model runs in eval mode without gradients; a forward hook captures the first output
    of the module (a module called several times in one forward contributes its first call)
    and stops the forward pass there. The hook is removed and the mode restored afterwards.

    Args:
        model: the network.
        module_name: a name from ``model.named_modules()`` (``""`` is the whole model).
        batch_input: the model's input: a tensor ``model(x)``, a sequence ``model(*x)`` or a
            mapping ``model(**x)``, with leading batch dimension B.
        attention_mask: optional (B, T) mask for pooling (B, T, H) outputs.

    Returns:
        (B, h) float32 on the model's device (see :func:`pool`).

    Raises:
        ConfigError: ``module_name`` is not a module of ``model``.
        DataError: the forward pass never reached the module.
    """
    return pool(_capture(model, module_name, batch_input, stop=True)[0], attention_mask)


def label_error_features(model: nn.Module, module_name: str, x: Tensor, y: Tensor) -> Tensor:
    """Label-aware representation ``(onehot(y) - softmax(logits)) (x) h`` of a classifier's examples.

    ``h`` is the pooled output of ``module_name``; when the model ends in a linear layer reading
    ``h``, this is minus the per-example gradient of the cross-entropy with respect to that
    layer's weights (the quantity Representer points weight feature similarity by): examples the
    model already fits contribute little, and the label enters the representation.

    Args:
        x: (B, ...) inputs. y: (B,) int64 labels.

    Returns:
        (B, C*h) float32, class-major.
    """
    h, logits = _capture(model, module_name, x, stop=False)
    h = pool(h)  # (B, h)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != h.shape[0]:
        raise ShapeError(f"label-aware representations need (B, C) logits from the model, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    err = nn.functional.one_hot(y.long(), logits.shape[1]).float() - torch.softmax(logits.float(), dim=1)  # (B, C)
    return (err[:, :, None] * h[:, None, :]).reshape(h.shape[0], -1)


def _to_device(batch_input: ModelInput, device: torch.device) -> ModelInput:
    if isinstance(batch_input, Tensor):
        return batch_input.to(device)
    if isinstance(batch_input, Mapping):
        return {k: v.to(device) for k, v in batch_input.items()}
    return [v.to(device) for v in batch_input]


class _Unprojected:
    """The ``projector`` of the featurizer interface: representations are stored unprojected,
    so there is no projection matrix to cache or clear."""

    def clear_cache(self) -> None:
        return None


class RepresentationFeaturizer:
    """Hidden representations of a named module under given checkpoints.

    A drop-in for :class:`tda.featurizers.gradient.Featurizer` where scorers need representations
    instead of gradients (RepSim, docs/methods.md section 5).

    Args:
        model: the network (its weights are replaced by each checkpoint in turn).
        module_name: the module whose output is the representation.
        input_key: batch entry passed to the model, ``model(batch[input_key])``.
        device: where the forward runs (default: the model's device).
        mask_key: optional batch entry holding a (B, T) attention mask for sequence pooling;
            ignored when the batch has no such entry.
        inputs: optional ``inputs(batch, ids) -> [(model input, mask or None), ...]``
            replacing ``input_key``/``mask_key``; the representation is the mean over the views.
        feature_dim: width h of the representation when known (else set by :meth:`probe`).
        label_key: batch entry holding class labels; when given, the features are the
            label-aware :func:`label_error_features` ``(onehot(y) - softmax(logits)) (x) h``.
    """

    def __init__(
        self,
        model: nn.Module,
        module_name: str,
        input_key: str = "x",
        device: str | torch.device | None = None,
        mask_key: str | None = "attention_mask",
        inputs: InputViews | None = None,
        feature_dim: int | None = None,
        label_key: str | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        find_module(model, module_name)  # fail at construction on a misspelt name
        self.module_name = module_name
        self.input_key = input_key
        self.mask_key = mask_key
        if label_key is not None and inputs is not None:
            raise ConfigError("label-aware representations call model(batch[input_key]); pass label_key or inputs, "
                              "not both")
        self.inputs = inputs
        self.feature_dim = feature_dim
        self.label_key = label_key
        self.projector = _Unprojected()

    def spec(self) -> dict[str, Any]:
        """What determines the features (recorded in manifests and compared on reuse)."""
        spec = {"representation": self.module_name, "input_key": self.input_key,
                "mask_key": self.mask_key, "pooling": "mean-over-tokens"}
        if self.inputs is not None:
            views = getattr(self.inputs, "spec", None)
            spec["inputs"] = views() if callable(views) else getattr(self.inputs, "__name__", type(self.inputs).__name__)
        if self.label_key is not None:
            spec["label_aware"] = self.label_key
        return spec

    def probe(self, batch: Batch, ids: Sequence[int]) -> int:
        """Run one batch under the current weights to learn (and set) :attr:`feature_dim`."""
        feats, _ = self.featurize_batch(batch, ids, 0)
        self.feature_dim = int(feats.shape[1])
        return self.feature_dim

    def _views(self, batch: Batch, ids: Sequence[int]) -> Sequence[tuple[ModelInput, Tensor | None]]:
        if self.inputs is not None:
            return self.inputs(batch, np.asarray(ids))
        if self.input_key not in batch:
            raise ShapeError(
                f"batch has no {self.input_key!r} entry (has {sorted(batch)}); pass "
                "RepresentationFeaturizer(input_key=...) naming the model's input column"
            )
        return [(batch[self.input_key], batch.get(self.mask_key) if self.mask_key is not None else None)]

    def featurize_batch(
        self, batch: Batch, ids: Sequence[int], checkpoint: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Representations (B, h) float32 and ``q`` (B,) ones for one batch (loaded weights).

        ``checkpoint`` is unused (kept for the :class:`~tda.featurizers.gradient.Featurizer` signature).
        """
        views = self._views(batch, ids)
        if self.label_key is not None:
            if self.label_key not in batch:
                raise ShapeError(f"batch has no {self.label_key!r} labels (has {sorted(batch)}) for label-aware "
                                 "representations")
            h = label_error_features(self.model, self.module_name, _to_device(views[0][0], self.device),
                                     batch[self.label_key].to(self.device))  # (B, C*h)
        else:
            h = torch.stack([hidden_states(self.model, self.module_name, _to_device(x, self.device),
                                           None if mask is None else mask.to(self.device))
                             for x, mask in views]).mean(dim=0)  # (B, h), averaged over the views
        check_finite(h, ids, f"representations of module {self.module_name!r}")
        return h.cpu().numpy(), np.ones(h.shape[0], dtype=np.float32)

    def featurize(
        self,
        state: StateDict | str | Path,
        checkpoint: int,
        batches: Iterable[tuple[np.ndarray, Batch]],
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids (B,) int64, features (B, h) float32, q (B,) ones)`` per batch (the loop every
        featurizer shares: :func:`tda.featurizers.gradient.featurize_loop`)."""
        yield from featurize_loop(self.model, self.device, self.featurize_batch, state, checkpoint, batches,
                                  lambda: None)


__all__ = ["RepresentationFeaturizer", "find_module", "hidden_states", "label_error_features", "pool"]
