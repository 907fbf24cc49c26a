"""``tda query --run DIR --example ID``: top-k proponents and opponents of a run's examples.

Two paths give the same answer. The lean one (:mod:`pipelines.query_fast`) reads the fitted
state, the stored features and the index with numpy and faiss and never imports torch; the full
one (:func:`full_answer`) builds the scorer through the registry and the family, reads the data
sets for labels, and answers what the lean one cannot (or raises the error naming the fix).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tda.errors import QueryError

from .layout import RunPaths
from .query_fast import Answer, NotLean, check_k, lean_answer, load_predictions, search
from .report import format_query

logger = logging.getLogger(__name__)


def full_answer(paths: RunPaths, examples: list[int], split: str, k: int) -> Answer:
    """The answer through the scorer registry and the family (imports torch and the model code)."""
    from stores import FeatureStore

    from .run import datasets_for
    from .run_folder import QUERY_NEEDS, check_complete, labels_of, recorded_config, stored_features
    from .stages import load_index, load_scorer

    cfg = recorded_config(paths)
    check_complete(paths, QUERY_NEEDS, f"`tda run CONFIG --out {paths.root}`")
    t0 = time.time()
    scorer = load_scorer(cfg, paths)
    if split != "query" and not scorer.scores_new_inputs:
        raise QueryError(f"the {scorer.name} scorer holds scores of the run's own queries only and cannot score a "
                         f"{split} example; ask with --split query")
    block = stored_features(paths, examples, split)
    vectors = scorer.transform_query(block)  # (m, D)
    index = load_index(cfg, paths, dim=vectors.shape[1], n_train=FeatureStore.open(paths.store("train")).n)
    check_k(k, len(index))
    top, spent = search(index, vectors, k)  # every example in one search: the index is loaded once
    elapsed = time.time() - t0
    data = datasets_for(cfg, paths)
    labels, qlabels = labels_of(data["train"]), labels_of(data["query" if split == "query" else "train"])
    return Answer([int(i) for i in block.ids], top, labels, qlabels, cfg.score.scorer, len(index),
                  index.meta["kind"], elapsed, spent, load_predictions(paths) if split == "query" else None)


def answer(paths: RunPaths, examples: list[int], split: str, k: int) -> Answer:
    """The lean answer where it can be given, else the full one."""
    try:
        return lean_answer(paths, examples, split, k)
    except NotLean as exc:
        logger.info("tda query: full path (%s)", exc)
        return full_answer(paths, examples, split, k)


def print_answer(ans: Answer, k: int) -> None:
    for row, example in enumerate(ans.ids):
        pred = (ans.predicted or {}).get(int(example))
        print(format_query(int(example), ans.qlabels.get(int(example), "?"),
                           None if pred is None else f"{pred[0]} (p {pred[1]:.2f})", ans.top, row, ans.labels, k,
                           ans.scorer))
    print(f"  ({ans.elapsed * 1000:.0f} ms in all, {ans.search * 1000:.1f} ms searching; {len(ans.ids)} queries, "
          f"{ans.n_index} indexed training examples, {ans.kind} index)")


def cmd_query(args: argparse.Namespace) -> int:
    paths = RunPaths(Path(args.run).resolve())
    ans = answer(paths, list(dict.fromkeys(args.example)), args.split, args.k)
    if args.json:
        import json

        print(json.dumps(ans.as_dict(), indent=1))
    else:
        print_answer(ans, args.k)
    if args.html:
        from .html_report import answer_page

        out = Path(args.html)
        out.write_text(answer_page(paths, ans, args.split))
        if not args.json:
            print(f"  written to {out}")
    return 0
