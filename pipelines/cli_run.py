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

from .config import load_config
from .families import Reporting, family_for
from .layout import RunPaths, json_field, load_checkpoint_list
from .query_fast import LABELS_DIR, load_predictions, write_labels
from .report import format_query, predicted_text
from .run import claim_run_dir, datasets_for
from .run_folder import check_finished as _check_finished, class_names, labels_of as _labels, read_run_file
from .schema import RunConfig
from .stages import RUN_STAGES, STAGES, stage_featurize, stage_index, stage_retrain, stage_score, stage_train




def _stages(args: argparse.Namespace) -> list[str]:
    if args.only:
        return [args.only]
    if args.from_stage == "validate":
        return ["validate"]
    start = STAGES.index(args.from_stage) if args.from_stage else 0
    return list(STAGES[start:])


#: What each stage made in the run folder; ``--from STAGE`` deletes it for that stage and every
#: later one, so they are redone (derived data only: checkpoints named by model.checkpoints and
#: shared retraining folders are never touched).
STAGE_OUTPUTS = {"train": ("checkpoints",), "featurize": ("features-train", "features-query"),
                 "retrain": ("airrep",), "index": ("scorer", "index"), "score": ("scores", LABELS_DIR)}


def _forget(paths: RunPaths, stages: list[str]) -> None:
    """Under the run lock: delete the outputs of ``stages`` so that they run again. The last stage's
    go first and each folder goes whole (:func:`remove_tree`), so a kill never leaves a later stage's
    outputs beside a half-deleted earlier one."""
    for stage in reversed(stages):
        for name in STAGE_OUTPUTS.get(stage, ()):
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
    from .run import CLAIM_FILES

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
    todo = _stages(args)
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
            _forget(paths, _stages(args))
        for stage in todo:
            t = time.time()
            done.append(_run_stage(stage, cfg, paths, progress) + f" ({time.time() - t:.1f}s)")
        if "score" in todo:
            write_labels(cfg, paths)  # what `tda query` prints, for its numpy-only path
    if "score" in todo:
        print_report(cfg, paths)
        from .html_report import refresh_report

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


def _run_stage(stage: str, cfg: RunConfig, paths: RunPaths, progress: bool) -> str:
    """Run one stage; a line saying what it did (for the final summary)."""
    if stage == "train":
        ckpts = stage_train(cfg, paths, progress)
        if cfg.model.checkpoints or family_for(cfg).default_checkpoints(cfg):
            return f"train: none (model.checkpoints), {len(ckpts)} checkpoint(s) checked against the model"
        return f"train: {cfg.train.models} model(s), {len(ckpts)} attributed checkpoint(s)"
    if stage == "featurize":
        stats: dict = {}
        stage_featurize(cfg, paths, progress, stats=stats)
        choice = stats.pop("projection", None)
        parts = [f"{split} {s['examples']} examples x {s['checkpoints']} checkpoint(s), "
                 f"{s['jobs']} shard job(s) run" + (f" ({s['rows']} rows)" if s["jobs"] else ", all reused")
                 for split, s in stats.items()]
        if choice is not None:  # featurize.projection: auto, and what it meant
            parts.append(f"projection {choice['projection']} (auto: {choice['reason']})")
        return "featurize: " + "; ".join(parts)
    if stage == "retrain":
        subsets = stage_retrain(cfg, paths, progress)
        return f"retrain: {subsets} subset model(s)" if subsets else "retrain: not needed by " + cfg.score.scorer
    if stage == "index":
        index = stage_index(cfg, paths, progress)
        return f"index: {index.meta.get('kind', cfg.index.kind)} over {len(index)} training examples" + _ridge(paths)
    if stage == "score":
        outputs = stage_score(cfg, paths, progress)
        with np.load(outputs["topk"], allow_pickle=False) as z:
            shape = (len(z["query_ids"]), len(z["train_ids"]))
        dense = "dense scores and " if "scores" in outputs else ""
        return (f"score: {cfg.score.scorer}, {shape[0]} queries x {shape[1]} training examples, "
                f"{dense}top-{cfg.score.topk}")
    if stage == "validate":
        _validate(cfg, paths, progress)
        return f"validate: results in {paths.root / 'validation'}/"
    raise ConfigError(f"unknown stage {stage!r}; choose one of {RUN_STAGES}")


def _ridge(paths: RunPaths) -> str:
    """Which TRAK ridge the scorer used and why (from its manifest), or nothing for other scorers."""
    hyper = json_field(paths.scorer / "scorer.json", "hyperparameters")
    if not isinstance(hyper, dict) or not hyper.get("chosen_lambda_rel"):
        return ""
    chosen = ", ".join(f"{x:.3g}" for x in hyper["chosen_lambda_rel"])
    if hyper.get("lambda_rel") != "auto":
        return f"; TRAK ridge lambda_rel {chosen} (score.lambda_rel)"
    dfs = ", ".join(f"{x:.1f}" for x in hyper.get("target_df") or [])
    return (f"; TRAK ridge lambda_rel {chosen} per checkpoint (auto: {hyper.get('lambda_rule', '')}; "
            f"here df {dfs})")


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
    from .query_fast import labels_current

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
            from .stages.score import scores_current

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
        _validate(cfg, paths, progress=not args.quiet)
        from .html_report import refresh_report

        refresh_report(cfg, paths)
    return 0


def _validate(cfg: RunConfig, paths: RunPaths, progress: bool) -> None:
    """The validate stage (under the run lock) and its printed summary."""
    from .stages.validate import stage_validate

    res = stage_validate(cfg, paths, progress=progress)
    gt = res["ground_truth"]
    order = f", batch order {gt['batch_order']}, seed {gt['fixed_seed']}" if res["protocol"] == "small-drop" else ""
    print(f"LDS ({res['protocol']} protocol{order}) over {res['subsets']} subsets (alpha {res['alpha']:g}), "
          f"{res['n_queries']} queries, {res['checkpoints']} checkpoints; report fold")
    for name, r in res["scorers"].items():
        rep, cal = r["report"], r["calibration"]["fit"]
        print(f"  {name:<18} LDS {rep['mean']:.3f} [{rep['ci_low']:.3f}, {rep['ci_high']:.3f}] "
              f"({rep['n_undefined']} undefined); actual change = {cal['intercept']:+.3g} + {cal['slope']:.3g} x predicted")
    if "lds" in res:
        lds_ = res["lds"]
        print(f"  TRAK ridge: configured {lds_['configured']['label']}, tuning fold chose "
              f"{lds_['chosen_lambda_rel']:g}")
    if "linearity" in res:
        from .stages.validate_linearity import linearity_line

        print(linearity_line(res["linearity"]))
    gt_noise = res.get("ground_truth", {}).get("noise")
    if gt_noise:
        print(f"  ground truth: {res['models_per_subset']} models per subset agree at "
              f"{gt_noise['single_model_agreement']:.2f} (Spearman); no scorer can exceed LDS about "
              f"{gt_noise['lds_ceiling']:.2f} against it")
    if res.get("noise"):
        print(f"  score noise: {res['noise']['share_distinguishable']:.1%} of train-query pairs distinguishable "
              f"from zero across checkpoints (median |mean|/std {res['noise']['median_snr']:.2f})")
    if res.get("recipe"):
        r = res["recipe"]
        share = (f", queries right {r['correct_retrained']:.2f} vs {r['correct_checkpoints']:.2f}"
                 if "correct_retrained" in r else "")
        print(f"  recipe: a model retrained on the full set scores mean output {r['mean_output_retrained']:.3g} vs "
              f"{r['mean_output_checkpoints']:.3g} for the attributed checkpoints{share}"
              f"{'' if r['reproduces'] else ' -- the recipe does not reproduce them (see the warning)'}")
    if "removal" in res:
        rm = res["removal"]
        for mode, r in rm["modes"].items():
            print(f"  remove {mode:<6} k={rm['ks']}: mean change {np.round(r['mean_change'], 3).tolist()}, "
                  f"flip rate {np.round(r['flip_rate'], 2).tolist()}")
        print(f"  brittleness (smallest k flipping, -1 none): {rm['brittleness']}")
    print(f"written to {paths.root / 'validation'}/")
