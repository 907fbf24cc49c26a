"""The score stage: dense scores (a memmap written block by block, resumable) and top-k.

Memory holds the query vectors and one (n_query, block_rows) block, never the whole matrix;
``score.dense: false`` answers top-k from the index alone. The family may add results of its
own (:meth:`pipelines.families.base.Family.extra_results`), written here, never in a report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from stores import FeatureStore
from stores._io import reserve, save_json, save_npz, sha256_file
from tda.errors import StoreError
from tda.core.features import FeatureBlock, concat_blocks
from tda.core.kernel import iter_score_blocks

from pipelines.families import family_for
from pipelines.layout import RunPaths, fingerprint_version, json_field
from pipelines.spec.schema import SCORE_SECTIONS, RunConfig, section_fingerprint
from pipelines.methods.scorers import feature_kind
from pipelines.stages.index import _View, load_index, load_scorer

logger = logging.getLogger(__name__)


def _write_scores(cfg: RunConfig, paths: RunPaths, fp: str, qv: np.ndarray, scorer, train: FeatureStore,
                  progress: bool) -> Path:
    """Fill ``scores.partial.npy`` (a memmap) block by block, recording progress after each block.

    Memory holds the query vectors and one (n_query, block_rows) block, never the whole matrix;
    an interrupted pass resumes at the first block not recorded in ``scores.progress.json``.
    """
    partial, prog_path = paths.scores / "scores.partial.npy", paths.scores / "scores.progress.json"
    shape = (int(qv.shape[0]), len(train))
    key = {"fingerprint": fp, "shape": list(shape), "block_rows": cfg.score.block_rows}
    done = 0
    try:
        prog = json.loads(prog_path.read_text())
        if {k: prog.get(k) for k in key} == key and partial.is_file():
            out = np.lib.format.open_memmap(partial, mode="r+")
            done = int(prog["cols"]) if out.shape == shape and out.dtype == np.float32 else 0
            del out
    except (OSError, ValueError, KeyError, TypeError):
        done = 0
    if done == 0:
        prog_path.unlink(missing_ok=True)
        paths.scores.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
        reserve(partial, partial.stat().st_size)  # a full disk is an error now, not a SIGBUS mid-way
    elif done < shape[1]:
        logger.info("resuming scores at training column %d of %d", done, shape[1])
    out = np.lib.format.open_memmap(partial, mode="r+")
    bar = tqdm(total=shape[1], initial=done, desc="score", unit="train ex", disable=not progress)
    col = done
    for ids, block in iter_score_blocks(qv, scorer, _View(train, done), cfg.score.block_rows):
        out[:, col: col + len(ids)] = block  # (n_query, b)
        col += len(ids)
        out.flush()
        save_json(prog_path, {**key, "cols": col})
        bar.update(len(ids))
    bar.close()
    del out
    if col != shape[1]:
        raise StoreError(f"scored {col} of {shape[1]} training examples; delete {paths.scores} and rerun")
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    final = paths.scores / "scores.npy"
    os.replace(partial, final)
    prog_path.unlink(missing_ok=True)
    return final


def score_outputs(cfg: RunConfig, paths: RunPaths) -> dict[str, Path]:
    """The score stage's files: top-k, and the dense matrix unless ``score.dense`` is false."""
    outputs = {"topk": paths.scores / "topk.npz"}
    if cfg.score.dense:
        outputs["scores"] = paths.scores / "scores.npy"
    return outputs


def scores_current(cfg: RunConfig, paths: RunPaths) -> bool:
    """The stored scores were made with this config's settings and match their recorded sha256."""
    fp = section_fingerprint(cfg, *SCORE_SECTIONS, version=fingerprint_version(paths))
    recorded = json_field(paths.scores / "scores.json", "fingerprint")
    return recorded == fp and _outputs_intact(paths, score_outputs(cfg, paths))


def stage_score(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, Path]:
    """Dense scores (written block by block into a memmap, resumable; skipped with
    ``score.dense: false``) and top-k per query from the index."""
    fp = section_fingerprint(cfg, *SCORE_SECTIONS, version=fingerprint_version(paths))
    outputs = score_outputs(cfg, paths)
    if scores_current(cfg, paths):
        return outputs
    train, query = FeatureStore.open(paths.store("train")), FeatureStore.open(paths.store("query"))
    scorer = load_scorer(cfg, paths)
    qblk: FeatureBlock = concat_blocks(list(query.iter_blocks()))  # every shard (iter_blocks yields per shard)
    qv = scorer.transform_query(qblk)  # (n_query, D)
    index = load_index(cfg, paths, dim=qv.shape[1], n_train=len(train))
    (paths.scores / "scores.json").unlink(missing_ok=True)  # written last: until then no score file is trusted
    if cfg.score.dense:
        _write_scores(cfg, paths, fp, qv, scorer, train, progress)
    else:
        (paths.scores / "scores.npy").unlink(missing_ok=True)  # of an earlier configuration: not these scores
    top = index.top_k(qv, cfg.score.topk)
    save_npz(outputs["topk"], query_ids=qblk.ids, train_ids=train.ids(), proponent_ids=top.proponent_ids,
             proponent_scores=top.proponent_scores, opponent_ids=top.opponent_ids,
             opponent_scores=top.opponent_scores)
    family = family_for(cfg)
    family.extra_results(cfg, paths, scorer, feature_kind(cfg, family))
    save_json(paths.scores / "scores.json", {"fingerprint": fp, "n_query": len(query), "n_train": len(train),
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                             "sha256": {k: sha256_file(p) for k, p in outputs.items()}})
    return outputs


def _outputs_intact(paths: RunPaths, outputs: dict[str, Path]) -> bool:
    """Every output exists and matches the sha256 the finished stage recorded (a zeroed or
    truncated file is recomputed, never reused)."""
    want = json_field(paths.scores / "scores.json", "sha256")
    if not isinstance(want, dict) or set(want) != set(outputs):
        return False
    ok = all(p.is_file() and sha256_file(p) == want[k] for k, p in outputs.items())
    if not ok:
        logger.warning("scores in %s do not match their recorded sha256: recomputing them", paths.scores)
    return ok
