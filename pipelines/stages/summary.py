"""The line each stage adds to ``tda run``'s summary (named by :data:`pipelines.stages.STAGE_TABLE`).

Each function gets the run's config and folder and ``run``, the stage function with
``(cfg, paths, progress)`` bound: it runs the stage (asking it for what it needs to tell, such as
featurize's job counts) and returns the line.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from stores import scorer_state

from pipelines.families import family_for
from pipelines.layout import RunPaths
from pipelines.spec.schema import RunConfig

Run = Callable[..., Any]


def train_line(cfg: RunConfig, paths: RunPaths, run: Run) -> str:
    ckpts = run()
    if cfg.model.checkpoints or family_for(cfg).default_checkpoints(cfg):
        return f"train: none (model.checkpoints), {len(ckpts)} checkpoint(s) checked against the model"
    return f"train: {cfg.train.models} model(s), {len(ckpts)} attributed checkpoint(s)"


def featurize_line(cfg: RunConfig, paths: RunPaths, run: Run) -> str:
    stats: dict = {}
    run(stats=stats)
    choice = stats.pop("projection", None)
    parts = [f"{split} {s['examples']} examples x {s['checkpoints']} checkpoint(s), "
             f"{s['jobs']} shard job(s) run" + (f" ({s['rows']} rows)" if s["jobs"] else ", all reused")
             for split, s in stats.items()]
    if choice is not None:  # featurize.projection: auto, and what it meant
        parts.append(f"projection {choice['projection']} (auto: {choice['reason']})")
    return "featurize: " + "; ".join(parts)


def retrain_line(cfg: RunConfig, paths: RunPaths, run: Run) -> str:
    subsets = run()
    return f"retrain: {subsets} subset model(s)" if subsets else "retrain: not needed by " + cfg.score.scorer


def index_line(cfg: RunConfig, paths: RunPaths, run: Run) -> str:
    index = run()
    return f"index: {index.meta.get('kind', cfg.index.kind)} over {len(index)} training examples" + _ridge(paths)


def score_line(cfg: RunConfig, paths: RunPaths, run: Run) -> str:
    outputs = run()
    with np.load(outputs["topk"], allow_pickle=False) as z:
        shape = (len(z["query_ids"]), len(z["train_ids"]))
    dense = "dense scores and " if "scores" in outputs else ""
    return (f"score: {cfg.score.scorer}, {shape[0]} queries x {shape[1]} training examples, "
            f"{dense}top-{cfg.score.topk}")


def validate_line(cfg: RunConfig, paths: RunPaths, run: Run) -> str:
    print_validation(run(), paths)
    return f"validate: results in {paths.root / 'validation'}/"


def _ridge(paths: RunPaths) -> str:
    """Which TRAK ridge the scorer used and why (from its manifest), or nothing for other scorers."""
    hyper = scorer_state.marker_field(paths.scorer, "hyperparameters")
    if not isinstance(hyper, dict) or not hyper.get("chosen_lambda_rel"):
        return ""
    chosen = ", ".join(f"{x:.3g}" for x in hyper["chosen_lambda_rel"])
    if hyper.get("lambda_rel") != "auto":
        return f"; TRAK ridge lambda_rel {chosen} (score.lambda_rel)"
    dfs = ", ".join(f"{x:.1f}" for x in hyper.get("target_df") or [])
    return (f"; TRAK ridge lambda_rel {chosen} per checkpoint (auto: {hyper.get('lambda_rule', '')}; "
            f"here df {dfs})")


def print_validation(res: dict[str, Any], paths: RunPaths) -> None:
    """What ``tda validate`` (and ``tda run``'s validate stage) prints of the stage's results."""
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
        from pipelines.stages.validate_linearity import linearity_line

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
