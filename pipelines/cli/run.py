"""``tda run CONFIG`` and ``tda validate CONFIG``: the staged job of a config and its counterfactual check."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from stores import FeatureStore, StoreLock
from stores._io import remove_tree, sweep_removed, sweep_temporaries
from tda.errors import ConfigError, FingerprintMismatchError, ForeignStoreError, StoreError, TDAError

from pipelines.config import load_config
from pipelines.families import Reporting, family_for
from pipelines.layout import RunPaths, load_checkpoint_list
from pipelines.query.lean import load_predictions, write_labels
from pipelines.report import format_query, predicted_text
from pipelines.run import claim_run_dir, datasets_for
from pipelines.run_folder import check_finished as _check_finished, class_names, labels_of as _labels, read_run_file
from pipelines.spec.schema import RunConfig
from pipelines.stages import Stage, selected
from pipelines.stages.summary import print_validation


def _forget(paths: RunPaths, stages: list[Stage]) -> None:
    """Under the run lock: delete the outputs of ``stages`` so that they run again. The last stage's
    go first and each folder goes whole (:func:`remove_tree`), so a kill never leaves a later stage's
    outputs beside a half-deleted earlier one."""
    for stage in reversed(stages):
        for name in stage.outputs:
            if (paths.root / name).is_dir():
                remove_tree(paths.root / name)


def _cleanup_interrupted(paths: RunPaths, repair: bool) -> None:
    """Under the run lock: drop temporary files of killed writers; with ``repair`` drop damaged shards."""
    for tmp in paths.root.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    sweep_removed(paths.root)
    if repair:
        for split in ("train", "query"):
            if (paths.store(split) / "manifest.json").is_file():
                dropped = FeatureStore.open(paths.store(split)).repair()
                if dropped:
                    print(f"repair: {len(dropped)} damaged records dropped from {paths.store(split)}; re-featurizing",
                          file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    root = Path(args.out or cfg.out_dir).resolve()  # jobs carry it to workers started elsewhere
    paths = RunPaths(root)
    t0 = time.time()
    fresh = not root.exists()
    _make_run_folder(root)
    try:
        return _run_in(args, cfg, paths, t0)
    except BaseException:
        if fresh:
            _drop_empty_claim(root)  # a run refused before any work leaves no folder behind
        raise


def _drop_empty_claim(root: Path) -> None:
    """Remove ``root`` when it holds nothing but the claim files of a run that did no work."""
    from pipelines.run import CLAIM_FILES

    try:
        if root.is_dir() and all(p.name in CLAIM_FILES for p in root.iterdir()):
            remove_tree(root)
    except OSError:
        pass


def _check_no_links(root: Path) -> None:
    """A run folder's parts must be inside it: a symbolic link would make a rerun (or --overwrite)
    write or delete outside the run."""
    links = sorted(p.name for p in root.iterdir() if p.is_symlink())
    if links:
        raise StoreError(f"{root} holds symbolic links ({', '.join(links)}): a rerun would write or delete where they "
                         "point, outside the run; replace each link with a real folder (or choose another --out)")


def _run_in(args: argparse.Namespace, cfg: RunConfig, paths: RunPaths, t0: float) -> int:
    """``tda run``'s work in the (created) run folder ``paths.root``."""
    root = paths.root
    _check_no_links(root)
    _preflight(cfg)
    todo = selected(args.only, args.from_stage)  # the stages asked for (pipelines.stages.STAGE_TABLE)
    progress = not args.quiet
    done: list[str] = []
    with StoreLock(root):
        if paths.run_file.exists():
            try:
                read_run_file(paths)
            except TDAError:
                if not args.overwrite:
                    raise
                paths.run_file.unlink()  # damaged or foreign: --overwrite replaces it
        claim_run_dir(cfg, root, args.overwrite)
        _cleanup_interrupted(paths, args.repair)
        if args.from_stage:
            _forget(paths, todo)
        for stage in todo:
            t = time.time()
            done.append(stage.run(cfg, paths, progress) + f" ({time.time() - t:.1f}s)")
        scored = any(stage.name == "score" for stage in todo)
        if scored:
            write_labels(cfg, paths)  # what `tda query` prints, for its numpy-only path
    if scored:
        print_report(cfg, paths)
        from pipelines.cli.html_report import refresh_report

        refresh_report(cfg, paths)
    e = cfg.executor
    where = "local" if e.kind == "local" else f"dask ({e.address or f'LocalCluster, {e.workers} workers'})"
    print(f"\n{cfg.name}: done in {time.time() - t0:.1f}s on the {where} executor")
    for line in done:
        print(f"  {line}")
    print(f"outputs in {root}/: checkpoints/, features-train/, features-query/, scorer/, index/, "
          "scores/scores.npy (n_query x n_train), scores/topk.npz")
    return 0


def _make_run_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ForeignStoreError(f"the run folder {root} is an existing file; pass --out a folder (new or a tda run)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the run folder {root} ({exc.strerror}); choose a writable --out") from exc


def _preflight(cfg: RunConfig) -> None:
    """Checks that would otherwise fail only after all the work."""
    data = datasets_for(cfg)
    n_train = len(data["train"])
    class_names(cfg, data)  # data.class_names that miss a class: refused now, not after featurizing
    if cfg.score.topk > n_train:
        raise ConfigError(f"score.topk is {cfg.score.topk} but the training set has {n_train} examples; lower "
                          "score.topk or raise data.train_size")


def print_report(cfg: RunConfig, paths: RunPaths) -> None:
    family = family_for(cfg)
    text = family.report(cfg, paths) if isinstance(family, Reporting) else None  # a family's own report
    if text is not None:
        print(text)
        return
    data = datasets_for(cfg, paths)
    column = cfg.data.label_column if cfg.model.family in ("user", "hf") else "label"
    labels, qlabels = _labels(data["train"], column), _labels(data["query"], column)
    with np.load(paths.scores / "topk.npz", allow_pickle=False) as z:
        top = {k: z[k] for k in z.files}
    ckpts = load_checkpoint_list(paths)
    acc = family.query_accuracy(cfg, paths) if hasattr(family, "query_accuracy") else None
    print(f"\n{cfg.name}: {len(top['train_ids'])} training examples, {len(top['query_ids'])} queries, "
          f"{len(ckpts)} checkpoints" + (f", query accuracy {acc:.3f}" if acc is not None else ""))
    print("score > 0: training on the example raises the query's measured output f (proponent); "
          "f is the margin log(p/(1-p)) for classifiers, log p(completion | prompt) for language models")
    preds = load_predictions(paths) or {}  # recorded after the score stage (classifiers)
    names = class_names(cfg, data)
    for row in range(min(cfg.score.show, len(top["query_ids"]))):
        qid = int(top["query_ids"][row])
        print(format_query(qid, qlabels.get(qid, "?"), predicted_text(preds.get(qid), names), top, row, labels,
                           min(5, cfg.score.topk), cfg.score.scorer, names=names))


def _record_labels(cfg: RunConfig, paths: RunPaths) -> None:
    """A run killed after its score stage but before its labels were recorded gets them now
    (found by benchmarks/kills.py: curate on an empty folder, killed three times)."""
    from pipelines.query.lean import labels_current

    if not labels_current(paths):
        with StoreLock(paths.root):
            write_labels(cfg, paths)


def run_missing_stages(args: argparse.Namespace, cfg: RunConfig, paths: RunPaths, command: str) -> None:
    """``tda validate | curate | unlearn``: where the folder holds no finished run of this config,
    run ``tda run``'s stages first (each resumes: nothing already done is redone). A folder holding
    another configuration, or a damaged one, is refused as before."""
    sets = "".join(f" --set {item}" for item in args.set)
    finish = f"`tda run {args.config}{sets} --out {paths.root}`"
    if paths.run_file.is_file():
        try:
            _check_finished(cfg, paths, finish)
            from pipelines.stages.score import scores_current

            if scores_current(cfg, paths):
                _record_labels(cfg, paths)
                return
        except FingerprintMismatchError:
            raise
        except StoreError:
            read_run_file(paths, finish)  # a damaged or foreign run.json stays an error
    elif paths.root.is_dir() and any(paths.root.iterdir()):
        read_run_file(paths, finish)  # a folder of other files is not made a run folder
    print(f"tda {command}: {paths.root} holds no finished run of this config (or its scores are of other settings, "
          f"or damaged); running the stages it needs first (as {finish})", file=sys.stderr)
    cmd_run(argparse.Namespace(config=args.config, set=args.set, out=str(paths.root), overwrite=False, repair=False,
                               from_stage=None, only=None, quiet=args.quiet))


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    paths = RunPaths(Path(args.out or cfg.out_dir).resolve())
    finish = f"`tda run {args.config} --out {paths.root}`"
    run_missing_stages(args, cfg, paths, "validate")
    with StoreLock(paths.root) if paths.root.is_dir() else nullcontext():
        _check_finished(cfg, paths, finish)  # before any retraining; run.json is not rewritten
        sweep_temporaries(paths.root / "validation")  # what a killed earlier validate left half-written
        from pipelines.stages.validate import stage_validate

        print_validation(stage_validate(cfg, paths, progress=not args.quiet), paths)
        from pipelines.cli.html_report import refresh_report

        refresh_report(cfg, paths)
    return 0
