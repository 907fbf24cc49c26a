"""The ``ekfac`` scorer in configs: EK-FAC influence through the run's stages.

The training side is the factored projection of ``grad f`` (``featurize.projection: factored``),
the same features a factored TRAK run stores. The query side is preconditioned. Its featurizer
fits the EK-FAC factors of every attributed checkpoint on the training set in the projection's
space (LoGra: covariances of ``P_in^T a`` and ``P_out^T delta``, eigenbases, eigenvalue
correction on ``P_out^T G P_in``, damping; :mod:`tda.scorers.ekfac.factors`), then preconditions the projected
query gradients with them (:class:`tda.scorers.ekfac.features.EKFACQueryFeaturizer`); with
``k_in = k_out = null`` this is exact EK-FAC.
:class:`tda.scorers.EKFACScorer` takes the inner products, and the index serves them.

The factors are fitted once per run and stored in ``ekfac/factors.npz`` beside a record
(``ekfac/factors.json``: what they were fitted from, the file's sha256). A new query set,
``tda query --input``, ``tda serve`` and ``tda curate`` load them; a record of other settings or
checkpoints, or a file whose digest differs, means they are refitted and replaced (derived data).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from stores._io import fingerprint, save_json, sha256_file
from tda.errors import ConfigError

from pipelines.families import family_for, resolve_device
from pipelines.layout import json_field, load_checkpoint_list

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig


def check_ekfac(cfg: RunConfig) -> None:
    if cfg.featurize.projection != "factored":
        raise ConfigError("score.scorer 'ekfac' preconditions layer by layer and needs featurize.projection: "
                          f"factored (it is {cfg.featurize.projection!r}); set featurize.projection=factored")


def ekfac_query_featurizer(cfg: RunConfig, paths: RunPaths | None, train_fingerprint: str) -> Any:
    """The preconditioned query featurizer, with the run's stored EK-FAC factors when they were
    fitted from these training features (``train_fingerprint``) and checkpoints, else fitted now."""
    from tda.scorers.ekfac.factors import EKFACFactors
    from tda.scorers.ekfac.features import EKFACQueryFeaturizer

    check_ekfac(cfg)
    if paths is None:
        raise ConfigError("EK-FAC query features need the run folder (its checkpoints and training set)")
    family, f = family_for(cfg), cfg.featurize
    model, task, device = family.build_model(cfg), family.task(cfg), resolve_device(f.device)
    entries = load_checkpoint_list(paths)
    key = factors_key(train_fingerprint, entries)
    factors = _stored_factors(paths, key)
    if factors is None:
        factors = EKFACFactors.fit(model, task, family.datasets(cfg, paths)["train"], family.collate(cfg),
                                   [paths.checkpoint_file(e) for e in entries], f.batch_size, layers=f.params,
                                   checkpoint_ids=[int(e["id"]) for e in entries], device=device,
                                   projection={"k_in": f.k_in, "k_out": f.k_out, "seed": f.seed, "kind": f.projector})
        _store_factors(paths, key, factors)
    return EKFACQueryFeaturizer(model, task, factors, f.k_in, f.k_out, f.seed, f.projector, device)


def factors_file(paths: RunPaths) -> Path:
    return paths.root / "ekfac" / "factors.npz"


def factors_key(train_fingerprint: str, entries: list[dict[str, Any]]) -> str:
    """What the factors depend on: the training features' settings and the checkpoints' bytes."""
    return fingerprint({"features": train_fingerprint,
                        "checkpoints": [[int(e["id"]), e.get("sha256") or e.get("file")] for e in entries]})


def _stored_factors(paths: RunPaths, key: str) -> Any:
    """The run's stored factors when fitted from ``key`` and intact, else None (then refitted)."""
    from tda.scorers.ekfac.factors import EKFACFactors
    from tda.errors import TDAError

    path = factors_file(paths)
    record = path.with_suffix(".json")
    if json_field(record, "key") != key or not path.is_file() or json_field(record, "sha256") != sha256_file(path):
        return None
    try:
        return EKFACFactors.load(path)
    except TDAError:
        return None


def _store_factors(paths: RunPaths, key: str, factors: Any) -> None:
    """Save the factors, then their record (a kill between the two leaves no record: refitted)."""
    path = factors_file(paths)
    path.parent.mkdir(exist_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)
    factors.save(path)
    save_json(path.with_suffix(".json"), {"key": key, "sha256": sha256_file(path)})
