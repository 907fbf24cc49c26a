"""``tda curate``, ``tda unlearn`` and ``tda report``: the data-curation and unlearning commands on a finished
run, and its HTML report."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from pipelines.layout import RunPaths


def _on_finished_run(args: argparse.Namespace, stage: Callable, printer: Callable) -> int:
    """Run ``stage(cfg, paths, progress)`` on the finished run of ``args.config`` under its lock (after
    running the stages a missing or unfinished run lacks), then print."""
    from stores import StoreLock

    from pipelines.cli.run import run_missing_stages
    from pipelines.config import load_config
    from pipelines.run_folder import check_finished

    cfg = load_config(args.config, args.set)
    paths = RunPaths(Path(args.out or cfg.out_dir).resolve())
    run_missing_stages(args, cfg, paths, args.command)
    with StoreLock(paths.root) if paths.root.is_dir() else nullcontext():
        check_finished(cfg, paths, f"`tda run {args.config} --out {paths.root}`")  # before any retraining
        from stores._io import sweep_temporaries

        for folder in ("curation", "unlearning"):  # what a killed earlier run of these commands left half-written
            sweep_temporaries(paths.root / folder)
        printer(stage(cfg, paths, progress=not args.quiet), paths)
        from pipelines.cli.html_report import refresh_report

        refresh_report(cfg, paths)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from pipelines.workflows.curate import stage_curate
    from pipelines.workflows.report import print_curation

    return _on_finished_run(args, stage_curate, print_curation)


def cmd_unlearn(args: argparse.Namespace) -> int:
    from pipelines.workflows.unlearn import stage_unlearn
    from pipelines.workflows.report import print_unlearning

    return _on_finished_run(args, stage_unlearn, print_unlearning)


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.cli.html_report import write_report
    from pipelines.run_folder import QUERY_NEEDS, check_complete, recorded_config

    paths = RunPaths(Path(args.run).resolve())
    cfg = recorded_config(paths)
    check_complete(paths, {**QUERY_NEEDS, "scores": ("scores.json", "not scored")}, f"`tda run CONFIG --out {paths.root}`")
    print(f"wrote {write_report(cfg, paths, shown=args.queries)}")
    return 0
