"""The peers of ``benchmarks/featurize_lm.py``: traker's and bergson's projected per-example
gradients of the same output f the tda rows featurize, on in-memory tensors, and a check of any
featurizer's inner products against exact per-example gradients.

Each ``*_featurizer`` returns ``(featurize, info, covered)``: ``featurize(rows) -> (B, d)``
features of one batch (a mapping of tensors, already collated); ``info["chose"]``, a short
description of what ran (traker's is known after the first batch); the names of the parameters
whose gradient the features sketch.

- traker (MadryLab ``trak``): per-example gradients of ``task.output`` over every parameter from
  traker's ``FunctionalGradientComputer`` (``torch.func.vmap``), or its
  ``IterativeGradientComputer`` (one batched forward, one backward per example) when the model's
  code refuses vmap (BERT's attention-mask builder); projected by ``BasicProjector``, the
  projector ``TRAKer`` picks on a CPU (normal entries, blocks of 100 columns regenerated from
  their seeds on every call; features unscaled, as traker leaves them).
- bergson (EleutherAI, 2.5.1): its ``GradientCollector`` with ``skip_index=True`` hooked on the
  model's ``base_model`` (what ``bergson.collect_gradients`` hooks), driven by our own backward of
  ``task.output(model, rows).sum()``: the hooks only see module inputs and output gradients, so f
  is ours, not bergson's LM loss. Its hooks cover the weights of ``nn.Linear`` / HF ``Conv1D``
  modules only (no embeddings, LayerNorms, biases by default, nor heads outside ``base_model``).
  ``global``: each module's per-example gradient formed, then projected by its block of a
  (d, k) matrix regenerated from its Philox seed on every batch, summed into k dims;
  ``per_module`` (bergson's default): each module's gradient G sketched as L G R^T with
  p x p matrices (cached), p = floor(sqrt(k / modules)), so modules * p^2 <= k features.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

Rows = Mapping[str, Tensor]


def traker_featurizer(model: nn.Module, task, k: int, seed: int = 0) -> tuple[Callable, dict, list[str]]:
    """traker's gradient computer (vmap, else iterative) and CPU ``BasicProjector`` to k dims."""
    from trak.gradient_computers import FunctionalGradientComputer, IterativeGradientComputer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType
    from trak.utils import get_num_params, vectorize

    from tda.gradients.per_example import vmap_incompatible

    class TaskOutput(AbstractModelOutput):  # f = task.output, one example (vmap) or a batch
        def __init__(self, keys):
            self.keys = keys

        def get_output(self, model, weights, buffers, *tensors):
            if weights is None:  # IterativeGradientComputer: the batch at once, (B,) outputs
                return task.output(model, dict(zip(self.keys, tensors)))
            rows = {key: t.unsqueeze(0) for key, t in zip(self.keys, tensors)}

            def call(**kw):
                return torch.func.functional_call(model, (weights, buffers), args=(), kwargs=kw)
            return task.output(call, rows).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            raise NotImplementedError("featurization only")

    dim = get_num_params(model)
    projector = BasicProjector(grad_dim=dim, proj_dim=k, seed=seed, proj_type=ProjectionType.normal,
                               device=torch.device("cpu"))
    info = {"chose": "vmap grads, BasicProjector"}

    def featurize(rows: Rows) -> Tensor:
        keys = list(rows)
        batch = [rows[key] for key in keys]
        if info["chose"].startswith("vmap"):
            computer = FunctionalGradientComputer(model, TaskOutput(keys), dim, torch.float32, "cpu")
            try:
                grads = vectorize(computer.compute_per_sample_grad(batch), device="cpu")
                return projector.project(grads, model_id=0)
            except RuntimeError as exc:  # the model's code refuses vmap: traker's iterative computer
                if not vmap_incompatible(exc):
                    raise
                info["chose"] = "iterative grads, BasicProjector"
        computer = IterativeGradientComputer(model, TaskOutput(keys), dim, torch.float32, "cpu")
        return projector.project(computer.compute_per_sample_grad(batch), model_id=0)

    return featurize, info, [n for n, _ in model.named_parameters()]


def _flat_inputs(model: nn.Module, base: nn.Module, names, task, rows: Rows) -> list[str]:
    """The modules among ``names`` whose input is not (N, S, I) on ``rows`` (BERT's pooler: the [CLS] vector)."""
    seen, hooks = {}, []
    for name in names:
        def hook(module, inp, out, name=name):
            seen[name] = inp[0].ndim
        hooks.append(base.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        task.output(model, rows)
    for h in hooks:
        h.remove()
    return [name for name, ndim in seen.items() if ndim != 3]


def bergson_featurizer(model: nn.Module, task, k: int, target: str, probe: Rows) -> tuple[Callable, dict, list[str]]:
    """bergson's ``GradientCollector`` (no index) on ``model.base_model``, projection ``target``;
    modules whose input is not (N, S, I) on the ``probe`` batch, which its hooks assert against,
    left out through its ``filter_modules``."""
    from datasets import Dataset

    from bergson import GradientCollector, IndexConfig
    from bergson.utils.worker_utils import processor_for

    base = model.base_model
    flat = _flat_inputs(model, base, GradientCollector.discover_targets(base), task, probe)
    found = GradientCollector.discover_targets(base, filter_modules=",".join(flat) or None)
    p = k if target == "global" else math.isqrt(k // max(1, len(found)))
    unused = str(Path(tempfile.gettempdir()) / "bergson-bench-unused")  # no index: nothing is written
    cfg = IndexConfig(run_path=unused, projection_dim=p,
                      projection_target=target, filter_modules=",".join(flat) or None)
    rows_max = len(next(iter(probe.values())))
    data = Dataset.from_dict({"input_ids": [[0]] * rows_max})  # sizes the collector's loss buffer only
    collector = GradientCollector(model=base, cfg=cfg, processor=processor_for(cfg), data=data,
                                  skip_index=True, filter_modules=cfg.filter_modules)
    order = list(collector.shapes())

    def featurize(rows: Rows) -> Tensor:
        with collector.with_batch(None):  # registers the hooks for one forward + backward
            out = task.output(model, rows)
            out.sum().backward()
        model.zero_grad(set_to_none=True)
        grads = [collector.mod_grads[name] for name in order]
        collector.process_batch(list(range(len(out))), losses=out.detach())
        return torch.cat(grads, dim=1).float()

    found = collector.target_info
    ids = {id(par): name for name, par in model.named_parameters()}
    names = [ids[id(base.get_submodule(m).weight)] for m in found]
    names += [ids[id(base.get_submodule(m).bias)] for m, (_, _, bias) in found.items() if bias]
    kind = "Conv1D" if any(type(base.get_submodule(m)).__name__ == "Conv1D" for m in found) else "Linear"
    chose = (f"global {k}" if target == "global" else f"per_module {len(order)}x{p}^2={len(order) * p * p}")
    skipped = f", {'+'.join(flat)} left out (2-d input)" if flat else ""
    return featurize, {"chose": f"{chose}, {len(found)} {kind}{skipped}"}, names


def check(model: nn.Module, task, rows: Rows, feats: Tensor, names: list[str], scale: float = 1.0) -> dict:
    """Pairwise inner products of ``feats * scale`` against those of the exact per-example
    gradients (one autograd pass per example, over ``names``): the root mean square of
    ``(<phi_i, phi_j> - <g_i, g_j>) / (|g_i| |g_j|)`` over pairs i <= j, beside the JL figure
    ``sqrt(2 / d)`` for a d-dim Gaussian sketch (its error lies between sqrt(1/d) and that)."""
    from tda.gradients.per_example import loop_per_example_grads

    grads = loop_per_example_grads(model, task, dict(rows), names)
    g = torch.cat([grads[n].flatten(1) for n in names], dim=1).double()
    phi = feats.double() * scale
    exact, approx = g @ g.T, phi @ phi.T
    norms = exact.diagonal().sqrt()
    err = (approx - exact) / torch.outer(norms, norms)
    upper = torch.triu_indices(len(g), len(g))
    rms = float(err[upper[0], upper[1]].pow(2).mean().sqrt())
    return {"rms": rms, "jl": math.sqrt(2 / feats.shape[1]), "pairs": upper.shape[1]}
