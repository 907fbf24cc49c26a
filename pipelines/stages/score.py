"""The score stage: dense scores (a memmap written block by block, resumable) and top-k.

Memory holds the query vectors and one (n_query, block_rows) block, never the whole matrix;
``score.dense: false`` answers top-k from the index alone. The family may add results of its
own (:meth:`pipelines.families.base.Family.extra_results`), written here, never in a report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from stores import FeatureStore, scores_files
from tda.core.features import FeatureBlock, concat_blocks
from tda.core.kernel import iter_score_blocks

from pipelines.layout import RunPaths, fingerprint_version
from pipelines.spec.schema import RunConfig
from pipelines.spec.fingerprints import SCORE_SECTIONS, section_fingerprint
from pipelines.methods.bound import bind
from pipelines.stages.index import _View, load_index, load_scorer

logger = logging.getLogger(__name__)


def _write_scores(cfg: RunConfig, paths: RunPaths, fp: str, qv: np.ndarray, scorer, train: FeatureStore,
                  progress: bool) -> Path:
    """Fill the dense scores block by block (:class:`stores.scores_files.DenseWriter`: a memmap,
    progress recorded after each block); an interrupted pass resumes at the first block not recorded.

    Memory holds the query vectors and one (n_query, block_rows) block, never the whole matrix.
    """
    writer = scores_files.DenseWriter(paths.scores, (int(qv.shape[0]), len(train)),
                                      {"fingerprint": fp, "block_rows": cfg.score.block_rows})
    done = writer.done
    if 0 < done < len(train):
        logger.info("resuming scores at training column %d of %d", done, len(train))
    bar = tqdm(total=len(train), initial=done, desc="score", unit="train ex", disable=not progress)
    col = done
    for ids, block in iter_score_blocks(qv, scorer, _View(train, done), cfg.score.block_rows):
        col = writer.write(col, block)  # (n_query, b)
        bar.update(len(ids))
    bar.close()
    return writer.finish(col)


def score_outputs(cfg: RunConfig, paths: RunPaths) -> dict[str, Path]:
    """The score stage's files: top-k, and the dense matrix unless ``score.dense`` is false."""
    return scores_files.outputs(paths.scores, cfg.score.dense)


def scores_current(cfg: RunConfig, paths: RunPaths) -> bool:
    """The stored scores were made with this config's settings and match their recorded sha256."""
    fp = section_fingerprint(cfg, *SCORE_SECTIONS, version=fingerprint_version(paths))
    if scores_files.marker_field(paths.scores, "fingerprint") != fp:
        return False
    want = scores_files.marker_field(paths.scores, "sha256")
    if not isinstance(want, dict) or set(want) != set(score_outputs(cfg, paths)):
        return False
    if not scores_files.intact(paths.scores, cfg.score.dense):  # a zeroed or truncated file: recomputed
        logger.warning("scores in %s do not match their recorded sha256: recomputing them", paths.scores)
        return False
    return True


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
    index = load_index(cfg, paths, dim=qv.shape[1], n_train=len(train), scorer=scorer)
    scores_files.discard_marker(paths.scores)  # written last: until then no score file is trusted
    if cfg.score.dense:
        _write_scores(cfg, paths, fp, qv, scorer, train, progress)
    else:
        scores_files.discard_dense(paths.scores)  # of an earlier configuration: not these scores
    top = index.top_k(qv, cfg.score.topk)
    scores_files.save_topk(paths.scores, query_ids=qblk.ids, train_ids=train.ids(), proponent_ids=top.proponent_ids,
                           proponent_scores=top.proponent_scores, opponent_ids=top.opponent_ids,
                           opponent_scores=top.opponent_scores)
    run = bind(cfg, paths)
    run.family.extra_results(cfg, paths, scorer, run.kind)
    scores_files.save_marker(paths.scores, fingerprint=fp, n_query=len(query), n_train=len(train),
                             dense=cfg.score.dense, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return outputs

