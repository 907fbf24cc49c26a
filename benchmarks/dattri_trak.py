"""dattri's TRAK (TRAIS-Lab, `dattri.algorithm.trak.TRAKAttributor`) for benchmarks/traker_families.py.

One dattri `AttributionTask` over the checkpoints the tda runs attributed, at dattri's defaults
for everything that is its own design choice: its CPU projector (`random_project`, Gaussian
"normal" matrix, proj_seed 0, one matrix per checkpoint through ensemble_id), gradients of every
parameter divided by sqrt(d), `regularization` 0.0 added to X^T X, Q = 1 - p averaged over the
checkpoints, scores (n_train, n_test). What is set: proj_dim = featurize.k, and the function f
(dattri's `loss_func`, its `target_func` by default, so train and query gradients are of the same
f) is TRAK's margin log(p/(1-p)), the f of tda and of traker's image_classification task, written
as logit_y - logsumexp_{j != y} logit_j (`tda.models.tasks.classification_margin`); dattri's TRAK
example writes it logp - log(1 - exp(logp)), the same function, which turns infinite once p
rounds to 1 in float32.

dattri 0.3.0 declares numpy, scipy, pyyaml, tqdm and pretty_midi (no torch); its TRAK imports torch,
numpy, scipy and tqdm, never pretty_midi:
    pip install --no-deps dattri
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from tda.models.tasks import classification_loss_weight, classification_margin


def dattri_version() -> str:
    from importlib.metadata import version

    return version("dattri")


def per_example(model: nn.Module, fn: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """``fn(logits (1, C), y (1,)) -> (1,)`` as the per-example function dattri takes: (params, (x, y)) -> scalar."""
    def f(params: dict, data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return fn(logits, y.unsqueeze(0)).squeeze(0)
    return f


def probability(logits: Tensor, y: Tensor) -> Tensor:
    """p of the true label (dattri's ``correct_probability_func``; its Q is 1 - p)."""
    return 1.0 - classification_loss_weight(logits, y)


@contextlib.contextmanager
def projected_norms() -> Iterator[dict[int, float]]:
    """Sum over rows of ||phi||^2 of everything dattri's TRAK projects, per ensemble id (checkpoint),
    read off its own ``random_project`` while the block runs (the features are not changed); its
    progress bars are off meanwhile."""
    import dattri.algorithm.trak as module

    sums: dict[int, float] = {}
    original, bar = module.random_project, module.tqdm

    def recording(*args, **kwargs) -> Callable:
        project = original(*args, **kwargs)

        def run(feature, ensemble_id: int = 0) -> Tensor:
            out = project(feature, ensemble_id=ensemble_id)
            sums[ensemble_id] = sums.get(ensemble_id, 0.0) + float(out.detach().double().pow(2).sum())
            return out
        return run

    module.random_project, module.tqdm = recording, lambda items, **_: items
    try:
        yield sums
    finally:
        module.random_project, module.tqdm = original, bar


def dattri_scores(model: nn.Module, states: list[dict], train: dict, query: dict, k: int, batch: int,
                  regularization: float = 0.0) -> tuple[np.ndarray, list[float]]:
    """dattri's TRAK over ``states``: scores (n_train, n_query) as dattri returns them (> 0: training on
    i raises f on the query) and, per checkpoint, mean(diag(Phi^T Phi)) of its projected training
    gradients (the scale tda's lambda_rel multiplies)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def loader(d: dict) -> DataLoader:
        return DataLoader(TensorDataset(d["x"], d["y"]), batch_size=batch, shuffle=False)

    task = AttributionTask(loss_func=per_example(model, classification_margin), model=model, checkpoints=states)
    attributor = TRAKAttributor(task=task, correct_probability_func=per_example(model, probability),
                                projector_kwargs={"proj_dim": k}, device="cpu", regularization=regularization)
    with projected_norms() as sums:
        attributor.cache(loader(train))  # projects the training gradients only
        norms = dict(sums)
        scores = attributor.attribute(loader(query)).detach().double().numpy()
    return scores, [norms[i] / k for i in range(len(states))]


def geometric_mean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))
