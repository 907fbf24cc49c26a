"""Command line: ``tda run CONFIG``, ``tda validate CONFIG``, ``tda curate CONFIG``, ``tda unlearn CONFIG``,
``tda report RUN``, ``tda query --run DIR --example ID`` and ``tda serve RUN``.

Each subcommand's module is imported only when that subcommand runs: ``tda query`` on stored
examples imports numpy and faiss, not torch (:mod:`pipelines.query_fast`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from tda.errors import TDAError

from .cli_workflows import add_workflow_parsers
from .stages import RUN_STAGES

#: ``tda query`` runs its BLAS and OpenMP on one thread (unless these are set): its linear algebra
#: is a few (k x k) triangular solves and one search, and on a busy machine a pool of spinning
#: threads cost more than they give (the first solve of the default run: 1.8 s with two OpenBLAS
#: threads on two busy cores, 5 ms with one).
QUERY_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command that imports ``pipelines.<module>`` when it runs, then calls its ``name``."""
    def command(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"pipelines.{module}"), name)(args)

    command.__name__ = name
    return command


#: commands that read a run folder (not a config): code it names runs only with --trust-code
RUN_FOLDER_COMMANDS = ("query", "serve", "report")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tda")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tda", description="Training-data attribution: which training examples drove a prediction.")
    p.add_argument("--version", action="version", version=f"tda {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the staged job of a YAML config (train, featurize, index, score)")
    r.add_argument("config", help="YAML config, e.g. configs/mnist_trak.yaml")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set featurize.k=512")
    r.add_argument("--out", help="run folder (default: out_dir from the config)")
    r.add_argument("--overwrite", action="store_true", help="replace outputs of a different config in the run folder")
    r.add_argument("--repair", action="store_true",
                   help="check every stored shard against its sha256 and re-featurize missing, truncated or corrupt ones")
    r.add_argument("--from", dest="from_stage", choices=RUN_STAGES,
                   help="redo this stage and every later one (their outputs are deleted first; earlier "
                        "outputs must exist); validate runs only when named")
    r.add_argument("--only", choices=RUN_STAGES, help="run just this stage")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_lazy("cli_run", "cmd_run"))
    v = sub.add_parser("validate", help="counterfactual validation of a finished run: LDS, removal curves, noise")
    v.add_argument("config", help="the YAML config of the run")
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    v.add_argument("--out", help="run folder (default: out_dir from the config)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=_lazy("cli_run", "cmd_validate"))
    add_workflow_parsers(sub)
    q = sub.add_parser("query", help="top-k proponents/opponents of one example from a finished run")
    q.add_argument("--run", required=True, help="run folder written by `tda run`")
    q.add_argument("--trust-code", action="store_true",
                   help="let the run folder's recorded code (model.factory, data.collate, ...) run")
    q.add_argument("--example", type=int, nargs="+",
                   help="example id(s) (in the query split by default); several are answered in one search")
    q.add_argument("--list", action="store_true",
                   help="list the stored ids of the split (with labels, class names, predictions) instead")
    q.add_argument("--input", metavar="FILE|TEXT",
                   help="a new input: a rows file (parquet/csv/json/save_to_disk), an image file, or a text")
    q.add_argument("--label", help="with --input: the class (id or name) whose output is explained (default: the predicted one)")
    q.add_argument("--split", choices=("query", "train"), default="query", help="split the example comes from")
    q.add_argument("-k", type=int, default=10, help="how many proponents and opponents")
    q.add_argument("--chars", metavar="N",
                   help="cut texts at N characters, or 'all' for whole texts (default: score.text_chars, else whole)")
    q.add_argument("--json", action="store_true",
                   help="print the answer as JSON (ids, labels and class names, predictions, scores, texts)")
    q.add_argument("--html", metavar="FILE", help="also write the answer as a self-contained HTML page (images/text inline)")
    q.set_defaults(func=_lazy("cli_query", "cmd_query"))
    add_serve_parser(sub)
    return p


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="HTTP/JSON service answering top-k queries of a finished run (FastAPI + uvicorn)")
    s.add_argument("run", help="run folder written by `tda run`")
    s.add_argument("--trust-code", action="store_true",
                   help="let the run folder's recorded code (model.factory, data.collate, ...) run")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--max-body-mb", type=float, default=16, help="largest request body in MiB (default 16); larger gets 413")
    s.add_argument("--threads", type=int, default=1, help="FAISS threads per search (default 1: a single query gains little from more, concurrent "
                        "requests each take a core, and OpenMP threads spin-waiting on a busy machine cost more "
                        "than they give)")
    s.set_defaults(func=_lazy("serve", "cmd_serve"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "query" and "numpy" not in sys.modules:
        for var in QUERY_THREADS:  # before numpy and faiss load: see QUERY_THREADS
            os.environ.setdefault(var, "1")
    try:
        root = getattr(args, "run", None)
        if root is not None and args.command in RUN_FOLDER_COMMANDS:  # a folder's recorded code runs only if asked
            from .imports import untrusted_run

            with untrusted_run(Path(root).resolve(), getattr(args, "trust_code", False)):
                return args.func(args)
        return args.func(args)
    except TDAError as exc:
        print(f"tda: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tda unlearn ... | head`: the reader left; what was asked is written
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
