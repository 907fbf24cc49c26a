"""Featurization: per-example gradients of a task, projected per checkpoint.

Glue between :mod:`tda.gradients.per_example` and :mod:`tda.projections.projectors`: load a checkpoint into the model,
compute per-example gradients batch by batch, project them with the checkpoint's matrix, check
the result is finite, and return float32 features with the loss weights ``Q``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tda.errors import CheckpointError, ConfigError, DataError, DTypeError, ShapeError, reading
from tda.gradients.per_example import (check_finite, flatten_grads, linear_layers_for, linear_per_example_grads,
                        loop_per_example_grads, loss_weights, parameter_count, per_example_grads,
                        select_parameters, task_groups, vmap_incompatible)
from tda.projections.projectors import make_projector
from tda.models.tasks import Batch, Task

logger = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]
GRAD_METHODS = ("auto", "vmap", "linear", "loop")


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_weights(path: Path) -> Mapping:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _folder_weights(folder: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder (one file, or the shards of an index)."""
    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            import json

            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    loose = sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))[:3] \
        if folder.is_dir() else []
    hint = f"; it holds checkpoint files ({', '.join(loose)}, ...): name them with a glob, e.g. {folder}/*{Path(loose[0]).suffix}" \
        if loose else ""
    raise CheckpointError(f"checkpoint folder {folder} holds no {' or '.join(_WEIGHT_FILES)} (nor a sharded index) and no "
                          f"tda-checkpoints.json{hint}; pass a save_pretrained folder, a recorder's folder, a .safetensors "
                          "file or a torch.save state dict")


def load_checkpoint(source: StateDict | str | Path) -> dict[str, Tensor]:
    """A state dict from a mapping, a ``torch.save`` file (loaded with ``weights_only=True``), a
    ``.safetensors`` file, or a ``save_pretrained`` folder (its ``model.safetensors``, shards included)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        state: dict[str, Tensor] = {}
        for file in _folder_weights(path):
            state.update(load_checkpoint(file))
        return state
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; check the path")
    try:
        state = _read_weights(path)
    except Exception as exc:  # torch and safetensors raise several types for bad files
        if isinstance(exc, (PermissionError, IsADirectoryError)):
            raise reading(path, "checkpoint", "", CheckpointError).failure(exc) from exc
        reason = _load_failure(exc)
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a weights-only state dict ({reason}); no code in it "
            "was run; save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        ) from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict; save it "
                              "with torch.save(model.state_dict(), path)")
    return dict(state)


def _load_failure(exc: Exception) -> str:
    """The gist of a checkpoint reader's error: torch's weights-only unpickler explains its
    defaults at length (with terminal colours) before saying what it met."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        found = re.search(r"GLOBAL (\S+) was not an allowed global", rest)
        if found:
            return f"it pickles a {found.group(1)} object, not only tensors"
        return f"not a torch.save file of tensors: {rest.splitlines()[0].strip() if rest else 'unpickling failed'}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names sharing one parameter (e.g. a language model's head tied to its input embedding)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _ignorable(model: nn.Module, key: str) -> bool:
    """A key the model does not keep: a non-persistent buffer, or one it declares ignorable
    (transformers' ``_keys_to_ignore_on_load_unexpected`` patterns, e.g. old GPT-2 ``attn.bias``)."""
    mod_name, _, leaf = key.rpartition(".")
    try:
        if leaf in model.get_submodule(mod_name)._non_persistent_buffers_set:
            return True
    except AttributeError:
        pass
    return any(re.search(pat, key) for pat in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())


def _first(items: list[str], n: int = 5) -> str:
    return f"{items[:n]}" + (f" and {len(items) - n} more" if len(items) > n else "")


def apply_checkpoint(model: nn.Module, state: StateDict, label: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, with an error naming the first differences.

    Tied parameters count once: a state dict that holds one name of a tie (``save_pretrained``
    drops GPT-2's ``lm_head.weight``, tied to ``transformer.wte.weight``) fills the others; two
    tied names with different values are a mismatch. Keys of non-persistent buffers are ignored.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not _ignorable(model, k)}
    differ = []
    for names in _tied_groups(model):
        present = [n for n in names if n in state]
        differ += [f"{n} != {present[0]}" for n in present[1:] if not torch.equal(state[n], state[present[0]])]
        state.update({n: state[present[0]] for n in names if present and n not in state})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong or differ:
        tied = f", tied weights that differ {_first(differ)} (untie them in the model)" if differ else ""
        raise CheckpointError(
            f"{label} does not match the model: missing {_first(missing)}, unexpected "
            f"{_first(unexpected)}, shape mismatches {_first(wrong)}{tied}; build the model with the "
            "architecture the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)


def check_batch(batch: Batch, ids: Sequence[int]) -> None:
    """Raise unless ``batch`` is a mapping of tensors whose leading dimension is ``len(ids)``."""
    if not isinstance(batch, Mapping) or not batch:
        raise DataError(f"a batch must be a non-empty dict of tensors, got {type(batch).__name__}; "
                        "make collate return e.g. {'x': ..., 'y': ...}")
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            raise DTypeError(f"batch[{key!r}] is a {type(value).__name__}, not a torch.Tensor; make collate "
                             "convert columns with torch.from_numpy / torch.as_tensor")
        if value.ndim == 0 or value.shape[0] != len(ids):
            raise ShapeError(f"batch[{key!r}] has shape {tuple(value.shape)} but the batch has {len(ids)} example "
                             "ids; collate must return one row per example for every entry")


def batch_error(exc: Exception, batch: Batch) -> DataError | ConfigError:
    """Translate the model's failure on a batch into an error naming the batch's shapes and dtypes."""
    shapes = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in batch.items())
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if vmap_incompatible(exc):
        return ConfigError(f"the model's code cannot run under torch.func.vmap (batch with {shapes}): {text}; "
                           "use grad_method='auto' (falls back to one autograd pass per example) or 'loop'")
    if "dtype" in text or "scalar type" in text.lower():
        cls, fix = DTypeError, "make collate return inputs in the model's dtype (float32 for float32 weights)"
    elif "out of bounds" in text or "out of range" in text:
        cls, fix = DataError, "check the labels/indices of the batch (e.g. a label >= the number of classes)"
    else:
        cls, fix = ShapeError, "make collate return inputs of the shape the model expects"
    return cls(f"the model failed on a batch with {shapes}: {text}; {fix}")


def featurize_loop(
    model: nn.Module,
    device: torch.device,
    featurize_batch: Callable[[Batch, Sequence[int], int], tuple[np.ndarray, np.ndarray]],
    state: StateDict | str | Path,
    checkpoint: int,
    batches: Iterable[tuple[np.ndarray, Batch]],
    cleanup: Callable[[], None],
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The loop every featurizer shares: load the checkpoint strictly, check each batch, turn the
    model's failures into errors naming the batch, yield ``(ids, features, Q)``, clean up."""
    apply_checkpoint(model, load_checkpoint(state), f"checkpoint {checkpoint}")
    model.to(device)
    try:
        for ids, batch in batches:
            check_batch(batch, ids)
            try:
                phi, q = featurize_batch(batch, ids, checkpoint)
            except RuntimeError as exc:
                raise batch_error(exc, batch) from exc
            yield np.asarray(ids, dtype=np.int64), phi, q
    finally:
        cleanup()


class Featurizer:
    """Projected per-example gradients of ``task`` for ``model`` under given checkpoints.

    Args:
        model: the network (its weights are replaced by each checkpoint in turn).
        task: output function.
        k: projection dimension.
        seed: projection seed.
        kind: ``"rademacher"`` or ``"gaussian"``.
        param_names: parameters to differentiate (names or prefixes), ``None`` for all.
        device: where gradients are computed (default: the model's device).
        backend: projector backend (see :class:`tda.projections.projectors.Projector`); ``"auto"`` picks
            traker's ``fast_jl`` CUDA kernel when the model is on CUDA and the kernel is
            importable (k a multiple of 512, Rademacher, fp32), the dense blocked GEMM otherwise.
            The resolved backend is part of :meth:`spec`, so features of the two never mix.
        chunk_size: vmap chunk size bounding gradient memory.
        cache_bytes: memory budget for projection blocks kept between batches (Rademacher
            entries are kept as int8: the default 768 MiB holds P whole up to d x k = 805M,
            e.g. d = 670k at k = 1024; beyond, the rest is regenerated per pass).
        precision: projection precision, ``"fp32"`` or ``"bf16"`` (see :class:`~tda.projections.projectors.Projector`).
        grad_method: ``"vmap"`` (``torch.func``, any model), ``"linear"`` (one batched backward,
            per-example gradients as outer products; every selected parameter must belong to an
            ``nn.Linear``), ``"loop"`` (one autograd pass per example: any model, slowest) or
            ``"auto"`` (``"linear"`` where it applies, else ``"vmap"``, switching to ``"loop"``
            for good, with a logged warning, when the model's code cannot run under vmap, e.g.
            ``.item()`` or transformers' mask builders). All give the gradient of each example
            run alone, assuming examples do not interact in the eval-mode forward pass; the path
            that ran is :attr:`grad_method` (not part of :meth:`spec`: the features are the same).
            Tasks that split batches (:meth:`tda.models.tasks.Task.example_groups`, e.g. padded text in
            :mod:`tda.models.hf`) are run group by group.
        group_bytes: when P does not fit ``cache_bytes``, gradients of consecutive batches (up
            to this many bytes) are projected together so each regenerated block of P serves
            many examples; results are identical, only memory and speed change.
        projection: ``"dense"`` (the d x k matrix, :class:`~tda.projections.projectors.Projector`) or
            ``"sparse"`` (SJLT with ``nonzeros`` entries per coordinate, O(d s) per example,
            :class:`~tda.projections.sparse.SparseProjector`; ``kind``, ``backend`` and ``precision`` do
            not apply to it).
        nonzeros: sparse projection only: entries per gradient coordinate (s).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        k: int = 1024,
        seed: int = 0,
        kind: str = "rademacher",
        param_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
        cache_bytes: int = 768 << 20,
        precision: str = "fp32",
        grad_method: str = "auto",
        group_bytes: int = 256 << 20,
        projection: str = "dense",
        nonzeros: int = 1,
    ) -> None:
        if grad_method not in GRAD_METHODS:
            raise ConfigError(f"grad_method {grad_method!r} is unknown; use 'auto', 'vmap', 'linear' or 'loop'")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.task = task
        self.names = select_parameters(model, param_names)
        self.dim = parameter_count(model, self.names)
        self.projector = make_projector(projection, self.dim, k, seed, kind, backend, cache_bytes, precision,
                                    nonzeros, self.device)
        self.chunk_size = chunk_size
        self.group_bytes = group_bytes
        linear_ok = linear_layers_for(model, self.names) is not None
        if grad_method == "linear" and not linear_ok:
            raise ConfigError("grad_method 'linear' needs every selected parameter to be a weight or bias "
                              "of an nn.Linear; use grad_method 'vmap' (or 'auto') for this model")
        self.grad_method = "linear" if grad_method == "linear" or (grad_method == "auto" and linear_ok) else "vmap"
        if grad_method == "loop":
            self.grad_method = "loop"
        self._fallback = grad_method == "auto"  # vmap -> loop when the model's code refuses vmap
        self._logged: str | None = None

    def spec(self) -> dict[str, Any]:
        """What determines the features (recorded in manifests and compared on reuse)."""
        return {"task": self.task.name, "params": list(self.names), **self.projector.spec_dict()}

    def _to_device(self, batch: Batch) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def gradients(self, batch: Batch) -> Tensor:
        """Flat per-example gradients (B, d) of a device batch under the loaded weights, group by
        group when the task splits the batch (:meth:`tda.models.tasks.Task.example_groups`)."""
        groups = task_groups(self.task, batch)
        if len(groups) == 1:
            return self._group_gradients(groups[0][1])
        flat = None
        for rows, sub in groups:
            part = self._group_gradients(sub)
            if flat is None:
                n = next(iter(batch.values())).shape[0]
                flat = part.new_empty((n, part.shape[1]))
            flat[rows] = part
        return flat

    def _gradients(self, batch: Batch) -> Tensor:
        return self.gradients(batch)  # the earlier name

    def _group_gradients(self, batch: Batch) -> Tensor:
        flat = None
        if self.grad_method == "linear":
            flat = linear_per_example_grads(self.model, self.task, batch, self.names)
            if flat is None:
                self.grad_method = "vmap"  # a layer ran twice or the output is not per example
        if flat is None and self.grad_method == "vmap":
            try:
                flat = flatten_grads(per_example_grads(self.model, self.task, batch, self.names, self.chunk_size),
                                     self.names)
            except RuntimeError as exc:
                if not (self._fallback and vmap_incompatible(exc)):
                    raise
                logger.warning("per-example gradients: %s cannot run under vmap (%s); using one autograd pass per "
                               "example (grad_method 'loop') from now on", type(self.model).__name__,
                               str(exc).splitlines()[0][:160])
                self.grad_method = "loop"
        if flat is None:
            flat = flatten_grads(loop_per_example_grads(self.model, self.task, batch, self.names), self.names)
        if self._logged != self.grad_method:
            logger.info("per-example gradients of %s: grad_method %r", type(self.model).__name__, self.grad_method)
            self._logged = self.grad_method
        return flat

    def featurize_batch(self, batch: Batch, ids: Sequence[int], checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (B, k) float32 and Q (B,) float32 for one batch under the loaded weights."""
        batch = self._to_device(batch)
        return self._project(self.gradients(batch), ids, checkpoint), self._loss_weights(batch, ids)

    def _project(self, flat: Tensor, ids: Sequence[int], checkpoint: int) -> np.ndarray:
        phi = self.projector.project(flat, checkpoint)
        check_finite(phi, ids, "projected gradients")
        return phi.float().cpu().numpy()

    def _loss_weights(self, batch: Batch, ids: Sequence[int]) -> np.ndarray:
        q = loss_weights(self.model, self.task, batch)
        check_finite(q, ids, "loss weights Q")
        return q.cpu().numpy()

    def _group_rows(self) -> int:
        """Examples projected together: 1 (per batch) when P fits the block cache, else enough
        batches to fill ``group_bytes`` of gradients, so each generated block serves many rows."""
        p = self.projector
        if p.backend in ("fast_jl", "sparse") or p.matrix_bytes() <= p.cache_bytes:
            return 1
        return max(1, self.group_bytes // (p.dim * 4))

    def featurize(
        self,
        state: StateDict | str | Path,
        checkpoint: int,
        batches: Iterable[tuple[np.ndarray, Batch]],
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(ids, features (B, k), Q (B,))`` per batch under checkpoint ``checkpoint``."""
        if self._group_rows() == 1:
            yield from featurize_loop(self.model, self.device, self.featurize_batch, state, checkpoint, batches,
                                      self.projector.clear_cache)
            return
        apply_checkpoint(self.model, load_checkpoint(state), f"checkpoint {checkpoint}")
        self.model.to(self.device)
        try:
            yield from self._featurize_grouped(batches, checkpoint, self._group_rows())
        finally:
            self.projector.clear_cache()

    def _featurize_grouped(self, batches, checkpoint: int, group: int):
        """Gradients of consecutive batches projected in one pass over P; yields per batch."""
        pending: list[tuple[np.ndarray, Batch, Tensor]] = []

        def flush():
            flat = torch.cat([g for _, _, g in pending]) if len(pending) > 1 else pending[0][2]
            ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _, _ in pending])
            phi = self._project(flat, ids, checkpoint)
            del flat
            lo = 0
            for i, b, _ in pending:
                yield np.asarray(i, dtype=np.int64), phi[lo: lo + len(i)], self._loss_weights(b, i)
                lo += len(i)
            pending.clear()

        rows = 0
        for ids, batch in batches:
            check_batch(batch, ids)
            try:
                device_batch = self._to_device(batch)
                pending.append((ids, device_batch, self.gradients(device_batch)))
            except RuntimeError as exc:
                raise batch_error(exc, batch) from exc
            rows += len(ids)
            if rows >= group:
                yield from flush()
                rows = 0
        if pending:
            yield from flush()
