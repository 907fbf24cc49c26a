"""A projection as a typed spec, and the one factory that builds its featurizer.

Each projection is one frozen dataclass holding only the settings it uses; :func:`projection_spec`
picks them out of a larger set (the API's keywords, ``featurize`` in a config), so a setting
another projection uses never reaches it. :func:`make_featurizer` is the only place a projection
name turns into a featurizer: :class:`tda.Attributor`, the pipeline families
(:func:`pipelines.families.base.gradient_featurizer`) and :class:`tda.featurizers.diffusion.DiffusionFeaturizer`
all build theirs here.

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
    k: int = 1024
    seed: int = 0
    kind: str = "rademacher"
    backend: str = "auto"
    precision: str = "fp32"


@dataclass(frozen=True)
class SparseProjection:
    """SJLT with ``nonzeros`` entries per gradient coordinate (:class:`tda.projections.sparse.SparseProjector`)."""

    name: ClassVar[str] = "sparse"
    k: int = 1024
    seed: int = 0
    nonzeros: int = 1
    precision: str = "fp32"  # the only one it runs in; another is refused by the projector


@dataclass(frozen=True)
class TensorSketchProjection:
    """Each covered layer's gradient sketched into ``k`` outputs without forming it (:mod:`tda.projections.tensorsketch`)."""

    name: ClassVar[str] = "tensorsketch"
    k: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class FactoredProjection:
    """A Kronecker pair ``k_out x k_in`` per layer (LoGra, :mod:`tda.featurizers.factored`); ``None``: identity."""

    name: ClassVar[str] = "factored"
    k_in: int | None = 16
    k_out: int | None = 16
    seed: int = 0
    kind: str = "rademacher"


ProjectionSpec = Union[DenseProjection, SparseProjection, TensorSketchProjection, FactoredProjection]
#: projection name -> its spec class
SPECS: dict[str, type] = {cls.name: cls for cls in (DenseProjection, SparseProjection, TensorSketchProjection,
                                                     FactoredProjection)}
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
    """The featurizer of ``spec``: :class:`tda.featurizers.factored.FactoredFeaturizer` for the projections of
    captured layers (``param_names`` then names modules), else :class:`tda.featurizers.gradient.Featurizer`
    (``param_names`` names parameters; ``grad_method`` as there)."""
    if isinstance(spec, (TensorSketchProjection, FactoredProjection)):
        from tda.featurizers.factored import FactoredFeaturizer

        extra = ({"k": spec.k} if isinstance(spec, TensorSketchProjection) else
                 {"k_in": spec.k_in, "k_out": spec.k_out, "kind": spec.kind})
        return FactoredFeaturizer(model, task, seed=spec.seed, layers=param_names, device=device,
                                  chunk_size=chunk_size, projection=spec.name, **extra)
    if not isinstance(spec, (DenseProjection, SparseProjection)):
        raise ConfigError(f"{spec!r} is not a projection spec; build one with tda.featurizers.spec.projection_spec")
    from tda.featurizers.gradient import Featurizer

    extra = ({"kind": spec.kind, "backend": spec.backend} if isinstance(spec, DenseProjection) else
             {"nonzeros": spec.nonzeros})
    return Featurizer(model, task, k=spec.k, seed=spec.seed, param_names=param_names, device=device,
                      chunk_size=chunk_size, precision=spec.precision, grad_method=grad_method,
                      projection=spec.name, **extra)


__all__ = ["AUTO_CHOICES", "DenseProjection", "FactoredProjection", "ProjectionSpec", "SPECS", "SparseProjection",
           "TensorSketchProjection", "make_featurizer", "projection_spec", "spec_settings"]
