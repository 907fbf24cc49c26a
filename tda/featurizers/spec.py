"""A projection as a typed spec, and the one factory that builds its featurizer.

Each projection is one frozen dataclass holding only the settings it uses; :func:`projection_spec`
picks them out of a larger set (the API's keywords, ``featurize`` in a config), so a setting
another projection uses never reaches it. :func:`make_featurizer` is the only place a projection
name turns into a featurizer: :class:`tda.Attributor`, the pipeline families
(:func:`pipelines.families.base.gradient_featurizer`) and :class:`tda.featurizers.diffusion.DiffusionFeaturizer`
all build theirs here.

A new projection is one frozen dataclass with a ``name``, its settings as fields, one trait
(``width_is_k``: its feature width is ``k``, else a ``width(model, param_names)`` method says what
it is) and a ``featurizer(model, task, ...)`` method, registered with
:func:`register_projection`; the Attributor (``projection="<name>"``) and ``featurize.projection``
in a config then take it. ``tests/test_projection_plugin.py`` adds one from a test file.

=============== ================================ ===============================================
spec            settings                         featurizer
=============== ================================ ===============================================
dense           k, seed, kind, backend,          :class:`tda.featurizers.gradient.Featurizer` (P^T g)
                precision
sparse          k, seed, nonzeros, precision     :class:`tda.featurizers.gradient.Featurizer` (SJLT; fp32)
tensorsketch    k, seed                          :class:`tda.featurizers.factored.FactoredFeaturizer`
factored        k_in, k_out, seed, kind          :class:`tda.featurizers.factored.FactoredFeaturizer`
=============== ================================ ===============================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Sequence, Union

from tda.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tda.models.tasks import Task


@dataclass(frozen=True)
class DenseProjection:
    """``P^T g`` with a dense ``d x k`` matrix (``kind`` entries; ``backend`` ``fast_jl`` on CUDA)."""

    name: ClassVar[str] = "dense"
    width_is_k: ClassVar[bool] = True
    k: int = 1024
    seed: int = 0
    kind: str = "rademacher"
    backend: str = "auto"
    precision: str = "fp32"

    def featurizer(self, model: "nn.Module", task: "Task", **common: Any) -> Any:
        return _gradient_featurizer(self, model, task, common, kind=self.kind, backend=self.backend)


@dataclass(frozen=True)
class SparseProjection:
    """SJLT with ``nonzeros`` entries per gradient coordinate (:class:`tda.projections.sparse.SparseProjector`)."""

    name: ClassVar[str] = "sparse"
    width_is_k: ClassVar[bool] = True
    k: int = 1024
    seed: int = 0
    nonzeros: int = 1
    precision: str = "fp32"  # the only one it runs in; another is refused by the projector

    def featurizer(self, model: "nn.Module", task: "Task", **common: Any) -> Any:
        return _gradient_featurizer(self, model, task, common, nonzeros=self.nonzeros)


@dataclass(frozen=True)
class TensorSketchProjection:
    """Each covered layer's gradient sketched into ``k`` outputs without forming it (:mod:`tda.projections.tensorsketch`)."""

    name: ClassVar[str] = "tensorsketch"
    width_is_k: ClassVar[bool] = True
    k: int = 1024
    seed: int = 0

    def featurizer(self, model: "nn.Module", task: "Task", **common: Any) -> Any:
        return _layer_featurizer(self, model, task, common, k=self.k)


@dataclass(frozen=True)
class FactoredProjection:
    """A Kronecker pair ``k_out x k_in`` per layer (LoGra, :mod:`tda.featurizers.factored`); ``None``: identity."""

    name: ClassVar[str] = "factored"
    width_is_k: ClassVar[bool] = False
    k_in: int | None = 16
    k_out: int | None = 16
    seed: int = 0
    kind: str = "rademacher"

    def featurizer(self, model: "nn.Module", task: "Task", **common: Any) -> Any:
        return _layer_featurizer(self, model, task, common, k_in=self.k_in, k_out=self.k_out, kind=self.kind)

    def width(self, model: "nn.Module", param_names: Sequence[str] | None = None) -> int:
        """``sum over layers of k_out * k_in`` for ``model`` (a projection whose width is not ``k``
        says what it is)."""
        from tda.featurizers.factored import FactoredProjector, factored_layers

        return FactoredProjector(factored_layers(model, param_names), self.k_in, self.k_out).k


def _gradient_featurizer(spec: Any, model: "nn.Module", task: "Task", common: dict[str, Any], **extra: Any) -> Any:
    """:class:`tda.featurizers.gradient.Featurizer` (projects the flat per-example gradient;
    ``param_names`` names parameters)."""
    from tda.featurizers.gradient import Featurizer

    return Featurizer(model, task, k=spec.k, seed=spec.seed, precision=spec.precision, projection=spec.name,
                      **common, **extra)


def _layer_featurizer(spec: Any, model: "nn.Module", task: "Task", common: dict[str, Any], **extra: Any) -> Any:
    """:class:`tda.featurizers.factored.FactoredFeaturizer` (captured layers; ``param_names`` names
    modules; no ``grad_method``: it never forms the per-example gradient)."""
    from tda.featurizers.factored import FactoredFeaturizer

    common = {key: value for key, value in common.items() if key != "grad_method"}
    layers = common.pop("param_names", None)
    return FactoredFeaturizer(model, task, seed=spec.seed, layers=layers, projection=spec.name, **common, **extra)


ProjectionSpec = Union[DenseProjection, SparseProjection, TensorSketchProjection, FactoredProjection]
#: projection name -> its spec class (:func:`register_projection` adds one)
SPECS: dict[str, type] = {}


def register_projection(cls: type) -> type:
    """Make the spec class ``cls`` a projection by its ``name`` (usable as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or name in ("auto", *SPECS):
        raise ConfigError(f"projection {name!r}: a spec class needs a new, non-'auto' name")
    if not callable(getattr(cls, "featurizer", None)):
        raise ConfigError(f"projection {name!r}: its spec class needs a featurizer(model, task, ...) method")
    SPECS[name] = cls
    return cls


def unregister_projection(name: str) -> None:
    """Remove a projection added by :func:`register_projection` (tests, plug-ins that unload)."""
    SPECS.pop(name, None)


for _cls in (DenseProjection, SparseProjection, FactoredProjection, TensorSketchProjection):
    register_projection(_cls)

#: what ``auto`` may resolve to (:mod:`tda.featurizers.choice`, which decides with the model in hand)
AUTO_CHOICES = ("tensorsketch", "sparse")


def projection_spec(name: str, **settings: Any) -> ProjectionSpec:
    """The spec of projection ``name`` from ``settings``, keeping only the keys it uses.

    Raises:
        ConfigError: an unknown projection name.
    """
    cls = SPECS.get(name)
    if cls is None:
        raise ConfigError(f"projection {name!r} is unknown; use one of {sorted(SPECS)}")
    own = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in settings.items() if key in own})


def spec_settings(name: str, **settings: Any) -> dict[str, Any]:
    """``{"name": name, **its settings}``: what the features of projection ``name`` depend on, for
    fingerprints. ``auto``, which resolves only once the model is known, keeps the settings of every
    projection in :data:`AUTO_CHOICES` (so a setting neither of them uses still never counts)."""
    out: dict[str, Any] = {"name": name}
    for choice in AUTO_CHOICES if name == "auto" else (name,):
        out.update(asdict(projection_spec(choice, **settings)))
    return out


def make_featurizer(spec: ProjectionSpec, model: "nn.Module", task: "Task", *,
                    param_names: Sequence[str] | None = None, device: "str | torch.device | None" = None,
                    chunk_size: int | None = None, grad_method: str = "auto") -> Any:
    """The featurizer of ``spec`` (its ``featurizer`` method): for the projections of captured
    layers ``param_names`` names modules, else parameters (``grad_method`` as in
    :class:`tda.featurizers.gradient.Featurizer`)."""
    if type(spec) not in SPECS.values():
        raise ConfigError(f"{spec!r} is not a projection spec; build one with tda.featurizers.spec.projection_spec")
    return spec.featurizer(model, task, param_names=param_names, device=device, chunk_size=chunk_size,
                           grad_method=grad_method)


__all__ = ["AUTO_CHOICES", "DenseProjection", "FactoredProjection", "ProjectionSpec", "SPECS", "SparseProjection",
           "TensorSketchProjection", "make_featurizer", "projection_spec", "register_projection", "spec_settings",
           "unregister_projection"]
