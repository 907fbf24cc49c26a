"""The ``ekfac`` scorer in configs: EK-FAC influence through the run's stages.

The training side is the factored projection of ``grad f`` (``featurize.projection: factored``),
the same features a factored TRAK run stores. The query side is preconditioned. Its featurizer
fits the EK-FAC factors of every attributed checkpoint on the training set in the projection's
space (LoGra: covariances of ``P_in^T a`` and ``P_out^T delta``, eigenbases, eigenvalue
correction on ``P_out^T G P_in``, damping; :mod:`tda.ekfac`), then preconditions the projected
query gradients with them (:class:`tda.ekfac_features.EKFACQueryFeaturizer`); with
``k_in = k_out = null`` this is exact EK-FAC.
:class:`tda.scorers.EKFACScorer` takes the inner products, and the index serves them.

The factors are fitted once per process that featurizes queries (one for the local executor).
They are not stored: a new query set refits them (two passes over the training set per
checkpoint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tda.errors import ConfigError

from .families import family_for, resolve_device
from .layout import load_checkpoint_list

if TYPE_CHECKING:
    from .layout import RunPaths
    from .schema import RunConfig


def check_ekfac(cfg: RunConfig) -> None:
    if cfg.featurize.projection != "factored":
        raise ConfigError("score.scorer 'ekfac' preconditions layer by layer and needs featurize.projection: "
                          f"factored (it is {cfg.featurize.projection!r}); set featurize.projection=factored")


def ekfac_query_featurizer(cfg: RunConfig, paths: RunPaths | None) -> Any:
    """Fit the run's EK-FAC factors and return the preconditioned query featurizer."""
    from tda.ekfac import EKFACFactors
    from tda.ekfac_features import EKFACQueryFeaturizer

    check_ekfac(cfg)
    if paths is None:
        raise ConfigError("EK-FAC query features need the run folder (its checkpoints and training set)")
    family, f = family_for(cfg), cfg.featurize
    model, task, device = family.build_model(cfg), family.task(cfg), resolve_device(f.device)
    entries = load_checkpoint_list(paths)
    factors = EKFACFactors.fit(model, task, family.datasets(cfg, paths)["train"], family.collate(cfg),
                               [paths.checkpoint_file(e) for e in entries], f.batch_size, layers=f.params,
                               checkpoint_ids=[int(e["id"]) for e in entries], device=device,
                               projection={"k_in": f.k_in, "k_out": f.k_out, "seed": f.seed, "kind": f.projector})
    return EKFACQueryFeaturizer(model, task, factors, f.k_in, f.k_out, f.seed, f.projector, device)
