"""tda as a Quanda explainer: every scorer of :class:`tda.Attributor` under Quanda's metrics.

Example (``pip install quanda``; see ``pyproject.toml``'s ``benchmark`` extra)::

    from quanda.metrics.heuristics import TopKCardinalityMetric
    from tda.integrations.quanda import TDAExplainer

    explainer = TDAExplainer(model=model, train_dataset=train, checkpoints=["m0.pt", "m1.pt", "m2.pt"],
                             scorer="trak", scorer_options={"normalize": True})
    explanations = explainer.explain(test_x, targets=predicted)   # (m, n) torch.float32
    metric = TopKCardinalityMetric(model=model, train_dataset=train)
    metric.update(explanations); metric.compute()

``TDAExplainer`` subclasses ``quanda.explainers.Explainer`` and is built when first touched, so
this module imports without quanda; :class:`AttributorExplainer` (no quanda) holds the work:

- the training set (a PyTorch ``Dataset`` of ``(x, y)`` items, as Quanda passes it) is read once
  into tensors and given to :meth:`tda.Attributor.fit`;
- ``checkpoints`` are the ensemble's models (paths or state dicts; none: the model as it is),
  each read with ``checkpoints_load_func`` when one is given;
- :meth:`explain` is ``Attributor.scores({"x": test_data, "y": targets})``: the score of each
  training example for the margin of class ``targets`` (a label or the prediction);
- :meth:`self_influence` is ``Attributor.self_influence(target)`` (``"loss"`` by default: what
  detects mislabelled rows), rescaled by one positive factor so that its largest magnitude is
  ``n^2``: Quanda breaks ties by adding ``1e-4 x`` the row index before ranking, which would
  otherwise outweigh scores of order 1e-3 and reorder them by position.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tda.errors import DataError, MissingDependencyError

INSTALL = "pip install quanda (or pip install -e '.[benchmark]'; see pyproject.toml)"


def dataset_tensors(dataset: Any, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """A PyTorch ``Dataset`` of ``(x, y)`` items (Quanda's convention) as ``{"x": X, "y": Y}`` on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError("the training dataset's items must be (x, y) pairs, as Quanda's image and text "
                            f"classification datasets give; got a {type(batch).__name__}")
        xs.append(torch.as_tensor(batch[0]).detach().cpu())
        ys.append(torch.as_tensor(batch[1]).detach().cpu().long())
    return {"x": torch.cat(xs), "y": torch.cat(ys)}


def checkpoint_states(model: nn.Module, checkpoints: Sequence[Any] | Any | None,
                      load: Callable[[nn.Module, Any], Any] | None) -> list[Any]:
    """State dicts (or paths :class:`tda.Attributor` reads) of the ensemble: ``model``'s own state
    when there are none; each checkpoint loaded by ``load(model_copy, checkpoint)`` when given."""
    if checkpoints is None or (isinstance(checkpoints, (list, tuple)) and not checkpoints):
        return [model.state_dict()]
    items = list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
    if load is None:
        return items
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(item)
            continue
        twin = copy.deepcopy(model)
        load(twin, item)
        out.append({k: v.detach().cpu().clone() for k, v in twin.state_dict().items()})
    return out


class AttributorExplainer:
    """Quanda's explainer interface over :class:`tda.Attributor` (any scorer), without quanda.

    Args:
        model: the classifier (architecture of every checkpoint).
        train_dataset: PyTorch ``Dataset`` of ``(x, y)`` items.
        checkpoints: the ensemble (paths or state dicts); ``None``: ``model`` as it is.
        checkpoints_load_func: ``load(model, checkpoint)`` for checkpoints in another format.
        scorer: ``"trak"`` (default), ``"tracin"``, ``"graddot"``, ``"gradcos"``, ``"ekfac"``,
            ``"magic"`` or a ``tda.Scorer``; ``scorer_options`` go with it (``{"normalize":
            True}``: TRAK's cosine after whitening, :mod:`tda.scorers.trak_variants`).
        self_influence_target: ``"loss"`` (default) or ``"output"``, see
            :meth:`tda.Attributor.self_influence`.
        attributor_options: further :class:`tda.Attributor` arguments (``k``, ``projection``,
            ``batch_size``, ``seed``, ...).
    """

    def __init__(self, model: nn.Module, train_dataset: Any, checkpoints: Any = None,
                 checkpoints_load_func: Callable | None = None, scorer: Any = "trak",
                 scorer_options: Mapping[str, Any] | None = None, self_influence_target: str = "loss",
                 **attributor_options: Any) -> None:
        from tda.api import Attributor

        self.tda_model = model
        self.train_tensors = dataset_tensors(train_dataset)
        states = checkpoint_states(model, checkpoints, checkpoints_load_func)
        self.attributor = Attributor(model, states, scorer=scorer, scorer_options=scorer_options,
                                     **attributor_options)
        self.attributor.fit(self.train_tensors)
        self.self_influence_target = self_influence_target

    def _output_device(self) -> torch.device:
        return next(iter(self.tda_model.parameters())).device

    def explain(self, test_data: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(m, n) float32 scores: training example i's effect on the margin of class ``targets[j]``
        at ``test_data[j]`` (> 0: training on i raises it)."""
        y = torch.as_tensor(targets).detach().cpu().long().reshape(-1)
        x = torch.as_tensor(test_data).detach().cpu()
        if len(x) != len(y):
            raise DataError(f"{len(x)} test inputs but {len(y)} targets; give one target class per input")
        scores = self.attributor.scores({"x": x, "y": y})
        return torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).to(self._output_device())

    def raw_self_influence(self) -> np.ndarray:
        """(n,) float64 self-influence of each training row, in the dataset's order."""
        _, scores = self.attributor.self_influence(self.self_influence_target)
        return np.asarray(scores, dtype=np.float64)

    def self_influence(self, batch_size: int = 32) -> torch.Tensor:
        """(n,) float32 self-influence, scaled so that its largest magnitude is ``n^2`` (same order;
        Quanda's ``1e-4 x`` row-index tie-break then cannot reorder it). ``batch_size`` is unused."""
        raw = self.raw_self_influence()
        top = float(np.max(np.abs(raw))) if raw.size else 0.0
        scaled = raw * (float(len(raw)) ** 2 / top) if top > 0 else raw
        return torch.from_numpy(scaled.astype(np.float32)).to(self._output_device())


_BUILT: dict[str, type] = {}


def _explainer_class() -> type:
    """``TDAExplainer``: :class:`AttributorExplainer` as a ``quanda.explainers.Explainer``."""
    if "TDAExplainer" in _BUILT:
        return _BUILT["TDAExplainer"]
    try:
        from quanda.explainers import Explainer
    except ImportError as exc:
        raise MissingDependencyError(f"tda.integrations.quanda.TDAExplainer needs quanda: {INSTALL}") from exc

    def __init__(self, model, train_dataset, checkpoints=None, checkpoints_load_func=None,
                 task="image_classification", scorer="trak", scorer_options=None,
                 self_influence_target="loss", **attributor_options):
        Explainer.__init__(self, model=model, train_dataset=train_dataset, task=task, checkpoints=checkpoints,
                           checkpoints_load_func=checkpoints_load_func)
        AttributorExplainer.__init__(self, model, train_dataset, checkpoints, checkpoints_load_func, scorer=scorer,
                                     scorer_options=scorer_options, self_influence_target=self_influence_target,
                                     **attributor_options)

    cls = type("TDAExplainer", (AttributorExplainer, Explainer), {
        "__init__": __init__, "accepted_tasks": ["image_classification", "text_classification"],
        "__doc__": AttributorExplainer.__doc__, "__module__": __name__})
    _BUILT["TDAExplainer"] = cls
    return cls


def __getattr__(name: str) -> Any:
    if name == "TDAExplainer":
        return _explainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttributorExplainer", "INSTALL", "TDAExplainer", "checkpoint_states", "dataset_tensors"]
