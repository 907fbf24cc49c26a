"""Fingerprints of a run's config: what each stored artifact depends on, hashed.

A feature store, the fitted scorer, the index and the scores each record the fingerprint of the
config sections they depend on (:data:`FEATURE_SECTIONS`, :data:`SCORE_SECTIONS`); a resumed or
queried run compares them. Scheme 2 (:data:`pipelines.layout.FINGERPRINT_VERSION`) hashes
``featurize`` as the chosen projection's typed spec; a run folder keeps the scheme it was made under.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stores._io import fingerprint
from tda.featurizers.spec import spec_settings

from pipelines.layout import FINGERPRINT_VERSION
from pipelines.spec.method import find_method
from pipelines.spec.schema import (IMPORT_KEYS, LATER_KEYS, QUERY_KEYS, UNHASHED_KEYS, UNHASHED_SECTION_KEYS,
                                   FeaturizeConfig, RunConfig, input_digests)


def stable_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as a dict without the :data:`LATER_KEYS` that sit at their defaults,
    so hashes of configs written before those keys existed do not change; input paths replaced by
    their content digests (:func:`input_digests`) and code files by their names."""
    d = cfg.to_dict()
    for key in UNHASHED_KEYS:
        d.pop(key, None)
    for section, key in UNHASHED_SECTION_KEYS:
        d[section].pop(key, None)
    for name, digest in input_digests(cfg).items():
        section, key = name.split(".")
        d[section][key] = {"sha256": digest}
    for section, key in IMPORT_KEYS:
        value = d[section].get(key)
        if isinstance(value, str) and ".py:" in value:
            file, _, fn = value.rpartition(":")
            d[section][key] = f"{Path(file).name}:{fn}"
    for (section, key), default in LATER_KEYS.items():
        if section in d and d[section].get(key) == default:
            del d[section][key]
    return d


#: Score keys that change only what is written or printed, never the fitted scorer or index.
OUTPUT_KEYS = ("topk", "show", "block_rows", "dense", "influential_fraction", "text_chars")


def section_fingerprint(cfg: RunConfig, *sections: str, queries: bool = True, outputs: bool = True,
                        version: int = FINGERPRINT_VERSION) -> str:
    """Hash of the named sections of the resolved config (see :func:`stable_dict`); with
    ``queries=False`` the :data:`QUERY_KEYS` are left out (fingerprints of the training side),
    with ``outputs=False`` the :data:`OUTPUT_KEYS`. ``version``: the fingerprint scheme
    (:data:`pipelines.layout.FINGERPRINT_VERSION`; a run folder keeps the one it was made under):
    from 2 on ``featurize`` enters as :func:`featurize_entry`, under 1 with every key."""
    d = stable_dict(cfg)
    for flag, section, keys in ((queries, "data", QUERY_KEYS), (outputs, "score", OUTPUT_KEYS)):
        if not flag:
            for key in keys:
                d[section].pop(key, None)
    if version >= 2:
        d["featurize"] = featurize_entry(cfg.featurize)
    return fingerprint({s: d[s] for s in sections})


#: ``featurize`` keys that are settings of a projection: in fingerprints only as its typed spec
PROJECTION_KEYS = ("projection", "k", "projector", "seed", "backend", "nonzeros", "k_in", "k_out")


def projection_settings(f: FeaturizeConfig) -> dict[str, Any]:
    """``featurize``'s projection settings under the names :func:`tda.featurizers.spec.projection_spec`
    takes (each projection keeps its own)."""
    return {"k": f.k, "seed": f.seed, "kind": f.projector, "backend": f.backend, "nonzeros": f.nonzeros,
            "k_in": f.k_in, "k_out": f.k_out}


def featurize_entry(f: FeaturizeConfig) -> dict[str, Any]:
    """``featurize`` as fingerprint scheme 2 hashes it: the keys every projection reads, and under
    ``projection`` the chosen projection's typed spec (:func:`tda.featurizers.spec.spec_settings`:
    only its own keys; ``auto`` those of what it may resolve to)."""
    entry = {key: value for key, value in dataclasses.asdict(f).items() if key not in PROJECTION_KEYS}
    return {**entry, "projection": spec_settings(f.projection, **projection_settings(f))}


def scorer_fingerprint(cfg: RunConfig, version: int = FINGERPRINT_VERSION) -> str:
    """Hash of what the fitted scorer and the index depend on: the training side of the feature
    sections, the scorer's settings and the index settings (not the output keys, and not the
    queries unless the scorer is query-bound: its fitted state holds scores of the run's queries, MAGIC)."""
    method = find_method(cfg.score.scorer)
    bound = method is not None and method.query_bound
    return section_fingerprint(cfg, *SCORE_SECTIONS, queries=bound, outputs=False, version=version)


FEATURE_SECTIONS = ("data", "model", "train", "featurize")
SCORE_SECTIONS = FEATURE_SECTIONS + ("score", "index")


__all__ = ["FEATURE_SECTIONS", "OUTPUT_KEYS", "PROJECTION_KEYS", "SCORE_SECTIONS", "featurize_entry",
           "projection_settings", "scorer_fingerprint", "section_fingerprint", "stable_dict"]
