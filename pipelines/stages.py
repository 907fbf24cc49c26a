"""The staged job: train -> featurize -> index -> score (-> report).

Each stage reads its inputs from the run folder, writes outputs atomically and records
completion, so a rerun skips finished work: training per model, featurization per
(checkpoint, shard), the index and scores per configuration fingerprint.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stores import FeatureStore, FaissIndex, build_index
from stores._io import atomic_write, save_json, save_npz, sha256_file
from tda.data import iter_batches
from tda.kernel import iter_score_blocks
from tda.scorers import make_scorer
from tda.training import accuracy, train_classifier

from .config import FEATURE_SECTIONS, SCORE_SECTIONS, RunConfig, section_fingerprint
from .run import (RunPaths, as_numpy_batch, build_model, collate_for, datasets_for,
                  load_checkpoint_list, make_featurizer)

logger = logging.getLogger(__name__)
STAGES = ("train", "featurize", "index", "score")


def stage_train(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> list[dict[str, Any]]:
    """Train ``cfg.train.models`` models, saving a checkpoint per epoch; skip finished models."""
    t = cfg.train
    data = datasets_for(cfg)
    done = {(c["model"], c["epoch"]): c for c in _read_list(paths)}
    train_b, query_b = as_numpy_batch(data["train"]), as_numpy_batch(data["query"])
    bar = tqdm(range(t.models), desc="train", unit="model", disable=not progress)
    for m in bar:
        if all((m, e) in done and paths.checkpoint(m, e).is_file() for e in range(t.epochs)):
            continue

        def save(epoch: int, model: torch.nn.Module, m: int = m) -> None:
            path = paths.checkpoint(m, epoch)
            atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
            done[(m, epoch)] = {"model": m, "epoch": epoch, "file": path.name, "sha256": sha256_file(path)}

        model = train_classifier(lambda: build_model(cfg), train_b["x"], train_b["y"], epochs=t.epochs,
                                 lr=t.lr, batch_size=t.batch_size, seed=t.seed + m, on_epoch=save)
        done[(m, t.epochs - 1)]["query_accuracy"] = accuracy(model, query_b["x"], query_b["y"])
        bar.set_postfix(acc=f"{done[(m, t.epochs - 1)]['query_accuracy']:.3f}")
        _write_list(paths, done)
    return _selected(cfg, paths)


def _read_list(paths: RunPaths) -> list[dict[str, Any]]:
    if not paths.checkpoint_list.is_file():
        return []
    return json.loads(paths.checkpoint_list.read_text())["all"]


def _write_list(paths: RunPaths, done: dict) -> None:
    entries = [done[k] for k in sorted(done)]
    save_json(paths.checkpoint_list, {"all": entries, "checkpoints": []})


def _selected(cfg: RunConfig, paths: RunPaths) -> list[dict[str, Any]]:
    """The attributed checkpoints, numbered 0..C-1, recorded in checkpoints.json."""
    entries = _read_list(paths)
    last = cfg.train.epochs - 1
    chosen = [e for e in entries if cfg.train.checkpoints == "all" or e["epoch"] == last]
    chosen = [{**e, "id": i} for i, e in enumerate(chosen)]
    save_json(paths.checkpoint_list, {"all": entries, "checkpoints": chosen})
    return chosen


def open_store(cfg: RunConfig, paths: RunPaths, split: str, n: int, spec: dict) -> FeatureStore:
    f = cfg.featurize
    ckpts = load_checkpoint_list(paths)
    fp = section_fingerprint(cfg, *FEATURE_SECTIONS) + f"-{split}"
    return FeatureStore.create(paths.store(split), n=n, k=f.k, checkpoints=[c["id"] for c in ckpts],
                               shard_size=f.shard_size, fingerprint=fp, spec={**spec, "split": split},
                               dtype=f.dtype)


def stage_featurize(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, FeatureStore]:
    """Featurize the train and query splits into their stores, shard by shard."""
    data = datasets_for(cfg)
    ckpts = {c["id"]: paths.checkpoints / c["file"] for c in load_checkpoint_list(paths)}
    featurizer = make_featurizer(cfg)
    stores = {}
    for split in ("train", "query"):
        ds = data[split]
        store = open_store(cfg, paths, split, len(ds), featurizer.spec())
        stores[split] = store
        todo: dict[int, list[int]] = defaultdict(list)
        for c, s in store.pending():
            todo[c].append(s)
        rows = sum(hi - lo for lo, hi in (store.shard_rows(s) for ss in todo.values() for s in ss))
        bar = tqdm(total=rows, desc=f"featurize {split}", unit="ex", disable=not progress or not rows)
        for c, shards in todo.items():
            for s in shards:
                lo, hi = store.shard_rows(s)
                batches = iter_batches(ds, collate_for(cfg), cfg.featurize.batch_size, lo, hi)
                parts = list(featurizer.featurize(ckpts[c], c, _counting(batches, bar)))
                store.write_shard(c, s, *(np.concatenate(p) for p in zip(*parts)))
            featurizer.projector.clear_cache()
        bar.close()
    return stores


def _counting(batches, bar):
    for ids, batch in batches:
        yield ids, batch
        bar.update(len(ids))


def scorer_for(cfg: RunConfig):
    return make_scorer(cfg.score.scorer, lambda_rel=cfg.score.lambda_rel)


def stage_index(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> FaissIndex:
    """Fit the scorer on the train store, save its state, build and save the FAISS index."""
    fp = section_fingerprint(cfg, *SCORE_SECTIONS)
    meta_path = paths.index / "index.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("fingerprint") == fp:
        return FaissIndex.load(paths.index)
    train = FeatureStore.open(paths.store("train"))
    scorer = scorer_for(cfg).fit(train)
    state = scorer.state_dict()
    save_npz(paths.scorer / "state.npz", **state)
    save_json(paths.scorer / "scorer.json", {"scorer": scorer.name, "fingerprint": fp,
                                             "hyperparameters": scorer.hyperparameters()})
    index = build_index(train, scorer, cfg.index.kind, cfg.index.nlist, cfg.index.nprobe,
                        meta={"fingerprint": fp})
    index.save(paths.index)
    return index


def load_scorer(cfg: RunConfig, paths: RunPaths):
    """The fitted scorer saved by the index stage (no pickle)."""
    with np.load(paths.scorer / "state.npz", allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    return scorer_for(cfg).load_state_dict(state)


def stage_score(cfg: RunConfig, paths: RunPaths, progress: bool = True) -> dict[str, Path]:
    """Dense scores (written block by block) and top-k proponents/opponents per query."""
    fp = section_fingerprint(cfg, *SCORE_SECTIONS)
    done_path = paths.scores / "scores.json"
    if done_path.is_file() and json.loads(done_path.read_text()).get("fingerprint") == fp:
        return {"scores": paths.scores / "scores.npy", "topk": paths.scores / "topk.npz"}
    train, query = FeatureStore.open(paths.store("train")), FeatureStore.open(paths.store("query"))
    scorer = load_scorer(cfg, paths)
    qblk = next(query.iter_blocks(len(query)))
    qv = scorer.transform_query(qblk)
    bar = tqdm(total=len(train), desc="score", unit="train ex", disable=not progress)

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(query), len(train)))
        col = 0
        for ids, block in iter_score_blocks(qv, scorer, train, cfg.score.block_rows):
            out[:, col: col + len(ids)] = block
            col += len(ids)
            bar.update(len(ids))
        out.flush()
        del out

    atomic_write(paths.scores / "scores.npy", write)
    bar.close()
    top = FaissIndex.load(paths.index).top_k(qv, cfg.score.topk)
    save_npz(paths.scores / "topk.npz", query_ids=qblk.ids, train_ids=train.ids(), proponent_ids=top.proponent_ids,
        proponent_scores=top.proponent_scores, opponent_ids=top.opponent_ids,
        opponent_scores=top.opponent_scores)
    save_json(done_path, {"fingerprint": fp, "n_query": len(query), "n_train": len(train),
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return {"scores": paths.scores / "scores.npy", "topk": paths.scores / "topk.npz"}
