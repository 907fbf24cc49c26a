"""Command line: ``tda COMMAND ...``, each command declared once in :data:`COMMANDS`, from which
:func:`build_parser` builds its subparser and :func:`main` runs it.

Each command's module is imported only when that command runs: ``tda query`` on stored
examples imports numpy and faiss, not torch (:mod:`pipelines.query.lean`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tda.errors import TDAError

from pipelines.methods.bound import one_command
from pipelines.stages import RUN_STAGES

#: ``tda query`` runs its BLAS and OpenMP on one thread (unless these are set): its linear algebra
#: is a few (k x k) triangular solves and one search, and on a busy machine a pool of spinning
#: threads cost more than they give (the first solve of the default run: 1.8 s with two OpenBLAS
#: threads on two busy cores, 5 ms with one).
QUERY_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Arg:
    """One argument of a command: what ``add_argument`` takes."""

    flags: tuple[str, ...]
    options: dict[str, Any]

    def but(self, **changes: Any) -> Arg:
        """The same argument with some options changed (a command's own help text)."""
        return Arg(self.flags, {**self.options, **changes})


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """One ``tda`` command."""

    name: str
    help: str
    #: ``pipelines.<module>``, imported only when the command runs, and its ``function(args) -> exit status``
    module: str
    function: str
    args: tuple[Arg, ...]
    #: the argument naming the run folder it reads (not a config); it is followed by ``--trust-code``,
    #: and the code the folder records runs only with it
    run_folder: Arg | None = None
    #: BLAS and OpenMP on one thread (:data:`QUERY_THREADS`)
    one_thread: bool = False

    def arguments(self) -> tuple[Arg, ...]:
        return ((self.run_folder, TRUST_CODE) if self.run_folder else ()) + self.args

    def load(self) -> Callable[[argparse.Namespace], int]:
        return getattr(importlib.import_module(f"pipelines.{self.module}"), self.function)


CONFIG = arg("config", help="the YAML config of the run")
SET = arg("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
OUT = arg("--out", help="run folder (default: out_dir from the config)")
QUIET = arg("--quiet", action="store_true", help="no progress bars")
#: the arguments of a command on the run of a config
ON_CONFIG = (CONFIG, SET, OUT, QUIET)
RUN_FOLDER = arg("run", help="run folder written by `tda run`")
TRUST_CODE = arg("--trust-code", action="store_true",
                 help="let the run folder's recorded code (model.factory, data.collate, ...) run")

RUN_ARGS = (
    CONFIG.but(help="YAML config, e.g. configs/mnist_trak.yaml"),
    SET.but(help="override a config value (repeatable), e.g. --set featurize.k=512"), OUT,
    arg("--overwrite", action="store_true", help="replace outputs of a different config in the run folder"),
    arg("--repair", action="store_true",
        help="check every stored shard against its sha256 and re-featurize missing, truncated or corrupt ones"),
    arg("--from", dest="from_stage", choices=RUN_STAGES,
        help="redo this stage and every later one (their outputs are deleted first; earlier "
             "outputs must exist); validate runs only when named"),
    arg("--only", choices=RUN_STAGES, help="run just this stage"), QUIET)
QUERY_ARGS = (
    arg("--example", type=int, nargs="+",
        help="example id(s) (in the query split by default); several are answered in one search"),
    arg("--list", action="store_true",
        help="list the stored ids of the split (with labels, class names, predictions) instead"),
    arg("--input", metavar="FILE|TEXT",
        help="a new input: a rows file (parquet/csv/json/save_to_disk), an image file, or a text"),
    arg("--label", help="with --input: the class (id or name) whose output is explained (default: the predicted one)"),
    arg("--split", choices=("query", "train"), default="query", help="split the example comes from"),
    arg("-k", type=int, default=10, help="how many proponents and opponents"),
    arg("--chars", metavar="N",
        help="cut texts at N characters, or 'all' for whole texts (default: score.text_chars, else whole)"),
    arg("--json", action="store_true",
        help="print the answer as JSON (ids, labels and class names, predictions, scores, texts)"),
    arg("--html", metavar="FILE", help="also write the answer as a self-contained HTML page (images/text inline)"))
SERVE_ARGS = (
    arg("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"),
    arg("--port", type=int, default=8000, help="TCP port (default 8000)"),
    arg("--max-body-mb", type=float, default=16, help="largest request body in MiB (default 16); larger gets 413"),
    arg("--threads", type=int, default=1,
        help="FAISS threads per search (default 1: a single query gains little from more, concurrent "
             "requests each take a core, and OpenMP threads spin-waiting on a busy machine cost more "
             "than they give)"))

REPORT_ARGS = (arg("--queries", type=int, help="queries shown (default: score.show, at least 6)"),)

#: every command, in the order ``tda --help`` lists them
COMMANDS = {c.name: c for c in (
    Command("run", "run the staged job of a YAML config (train, featurize, index, score)",
            "cli.run", "cmd_run", RUN_ARGS),
    Command("validate", "counterfactual validation of a finished run: LDS, removal curves, noise",
            "cli.run", "cmd_validate", ON_CONFIG),
    Command("curate", "rank suspected mislabelled training examples of a finished run; check by retraining",
            "cli.workflows", "cmd_curate", ON_CONFIG),
    Command("unlearn", "forget set of a group of queries, its predicted and retrained change",
            "cli.workflows", "cmd_unlearn", ON_CONFIG),
    Command("report", "write report.html (queries, attributions, curation, unlearning, validation) of a run",
            "cli.workflows", "cmd_report", REPORT_ARGS, run_folder=RUN_FOLDER),
    Command("query", "top-k proponents/opponents of one example from a finished run",
            "cli.query", "cmd_query", QUERY_ARGS, run_folder=arg("--run", required=True, **RUN_FOLDER.options),
            one_thread=True),
    Command("serve", "HTTP/JSON service answering top-k queries of a finished run (FastAPI + uvicorn)",
            "query.serve", "cmd_serve", SERVE_ARGS, run_folder=RUN_FOLDER),
)}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tda")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in :data:`COMMANDS` (it imports none of their modules)."""
    p = argparse.ArgumentParser(prog="tda", description="Training-data attribution: which training examples drove a prediction.")
    p.add_argument("--version", action="version", version=f"tda {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        c = sub.add_parser(command.name, help=command.help)
        for a in command.arguments():  # a copy of each option: no parser shares a default list
            c.add_argument(*a.flags, **{key: copy.copy(value) for key, value in a.options.items()})
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    if command.one_thread and "numpy" not in sys.modules:
        for var in QUERY_THREADS:  # before numpy and faiss load: see QUERY_THREADS
            os.environ.setdefault(var, "1")
    try:
        with one_command():  # what each command derives from a run, it derives once (pipelines.methods.bound)
            if command.run_folder is not None:  # a folder's recorded code runs only if asked
                from pipelines.imports import untrusted_run

                with untrusted_run(Path(args.run).resolve(), args.trust_code):
                    return command.load()(args)
            return command.load()(args)
    except TDAError as exc:
        print(f"tda: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tda unlearn ... | head`: the reader left; what was asked is written
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
