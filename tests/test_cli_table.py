"""The command table (:data:`pipelines.cli.main.COMMANDS`) and the stage table
(:data:`pipelines.stages.STAGE_TABLE`): the parser built from the first has every command and flag
the hand-written parser had, imports no command module, and the second drives ``--from`` /
``--only``, what ``--from`` deletes and the summary lines."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main as cli
from pipelines.cli.main import COMMANDS, build_parser, main
from pipelines.config import load_config
from pipelines.layout import RunPaths
from pipelines.stages import RUN_STAGES, STAGE_OUTPUTS, STAGE_TABLE, STAGES, selected, stage_named
from tda.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STAGE_NAMES = ("train", "featurize", "retrain", "index", "score", "validate")

# The parser as it was written by hand before the table: per command, in order, each argument's
# (flags, dest, action, default, choices, required, nargs, type, metavar).
_C = ("config",), "config", "store", None, None, True, None, None, None
_SET = ("--set",), "set", "append", [], None, False, None, None, "SECTION.KEY=VALUE"
_OUT = ("--out",), "out", "store", None, None, False, None, None, None
_QUIET = ("--quiet",), "quiet", "store_true", False, None, False, 0, None, None
_TRUST = ("--trust-code",), "trust_code", "store_true", False, None, False, 0, None, None
_RUN = ("run",), "run", "store", None, None, True, None, None, None
OLD = {
    "run": [_C, _SET, _OUT,
            (("--overwrite",), "overwrite", "store_true", False, None, False, 0, None, None),
            (("--repair",), "repair", "store_true", False, None, False, 0, None, None),
            (("--from",), "from_stage", "store", None, STAGE_NAMES, False, None, None, None),
            (("--only",), "only", "store", None, STAGE_NAMES, False, None, None, None), _QUIET],
    "validate": [_C, _SET, _OUT, _QUIET],
    "curate": [_C, _SET, _OUT, _QUIET],
    "unlearn": [_C, _SET, _OUT, _QUIET],
    "report": [_RUN, _TRUST, (("--queries",), "queries", "store", None, None, False, None, int, None)],
    "query": [(("--run",), "run", "store", None, None, True, None, None, None), _TRUST,
              (("--example",), "example", "store", None, None, False, "+", int, None),
              (("--list",), "list", "store_true", False, None, False, 0, None, None),
              (("--input",), "input", "store", None, None, False, None, None, "FILE|TEXT"),
              (("--label",), "label", "store", None, None, False, None, None, None),
              (("--split",), "split", "store", "query", ("query", "train"), False, None, None, None),
              (("-k",), "k", "store", 10, None, False, None, int, None),
              (("--chars",), "chars", "store", None, None, False, None, None, "N"),
              (("--json",), "json", "store_true", False, None, False, 0, None, None),
              (("--html",), "html", "store", None, None, False, None, None, "FILE")],
    "serve": [_RUN, _TRUST,
              (("--host",), "host", "store", "127.0.0.1", None, False, None, None, None),
              (("--port",), "port", "store", 8000, None, False, None, int, None),
              (("--max-body-mb",), "max_body_mb", "store", 16, None, False, None, float, None),
              (("--threads",), "threads", "store", 1, None, False, None, int, None)],
}
#: the commands that read a run folder (their recorded code runs only with --trust-code)
OLD_RUN_FOLDER_COMMANDS = {"query", "serve", "report"}
#: the module (under pipelines/) of each command's function: the old flat modules moved into packages
#: (cli_run -> cli/run.py, cli_workflows -> cli/workflows.py, cli_query -> cli/query.py, serve -> query/serve.py)
MODULES = {"run": "cli.run", "validate": "cli.run", "curate": "cli.workflows", "unlearn": "cli.workflows",
           "report": "cli.workflows", "query": "cli.query", "serve": "query.serve"}
ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true", argparse._AppendAction: "append"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _described(action: argparse.Action) -> tuple:
    choices = tuple(action.choices) if action.choices is not None else None
    return (tuple(action.option_strings) or (action.dest,), action.dest, ACTIONS[type(action)], action.default,
            choices, action.required, action.nargs, action.type, action.metavar)


def test_parser_has_every_old_command_and_flag():
    subs = _subparsers(build_parser())
    assert list(subs) == list(OLD)  # `tda --help` lists them in the old order
    for name, expected in OLD.items():
        actions = [a for a in subs[name]._actions if not isinstance(a, argparse._HelpAction)]
        assert [_described(a) for a in actions] == expected, name
        assert all(a.help for a in actions), name


def test_table_names_each_command_once():
    assert {name for name, c in COMMANDS.items() if c.run_folder is not None} == OLD_RUN_FOLDER_COMMANDS
    for name, command in COMMANDS.items():
        assert command.name == name and command.module == MODULES[name]
        fn = command.load()
        assert callable(fn) and fn.__name__ == command.function
    assert [name for name, c in COMMANDS.items() if c.one_thread] == ["query"]


def test_parsers_share_no_default_list():
    a = build_parser().parse_args(["validate", "a.yaml"])
    a.set.append("x=1")
    assert build_parser().parse_args(["validate", "b.yaml"]).set == [] and cli.SET.options["default"] == []


def _fresh(code: str) -> set[str]:
    """The pipelines and heavy modules a fresh interpreter has loaded after ``code``."""
    heavy = ("pipelines", "torch", "numpy")
    probe = f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.startswith({heavy!r})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(eval(done.stdout.strip().splitlines()[-1]))


def test_build_parser_imports_no_command_module():
    argv = {"run": "'c.yaml', '--from', 'index'", "validate": "'c.yaml'", "curate": "'c.yaml'", "unlearn": "'c.yaml'",
            "report": "'r'", "query": "'--run', 'r', '--example', '1'", "serve": "'r'"}
    parses = "\n".join(f"p.parse_args([{name!r}, {args}])" for name, args in argv.items())
    loaded = _fresh(f"from pipelines.cli.main import build_parser\np = build_parser()\n{parses}")
    commands = {f"pipelines.{m}" for m in MODULES.values()}
    stages = {f"pipelines.stages.{s.module}" for s in STAGE_TABLE} | {"pipelines.stages.summary"}
    assert not loaded & (commands | stages | {"torch", "numpy"}), loaded


@pytest.mark.parametrize("argv, module", [(["report", "{missing}"], "cli.workflows"),
                                          (["query", "--run", "{missing}", "--list"], "cli.query")])
def test_a_command_imports_its_module_only(tmp_path, argv, module):
    argv = [a.format(missing=tmp_path / "missing") for a in argv]
    loaded = _fresh(f"from pipelines.cli.main import main\nassert main({argv!r}) == 2")  # no such run folder
    assert f"pipelines.{module}" in loaded
    assert not loaded & {f"pipelines.{m}" for m in set(MODULES.values()) - {module}}, loaded


def test_stage_table():
    assert STAGES == STAGE_NAMES[:-1] and RUN_STAGES == STAGE_NAMES
    assert STAGE_OUTPUTS == {"train": ("checkpoints",), "featurize": ("features-train", "features-query"),
                             "retrain": ("airrep",), "index": ("scorer", "index"), "score": ("scores", "labels"),
                             "validate": ()}
    import pipelines.stages as stages
    from pipelines.stages import summary

    for stage in STAGE_TABLE:
        fn = stage.load()
        assert fn.__name__ == f"stage_{stage.name}" and fn.__module__ == f"pipelines.stages.{stage.module}"
        assert getattr(stages, stage.function) is fn  # the package's lazy export of it
        assert callable(getattr(summary, stage.summary))
    with pytest.raises(ConfigError, match=r"unknown stage 'fit'; choose one of \('train', "):
        stage_named("fit")


@pytest.mark.parametrize("only, start, expected", [
    (None, None, ["train", "featurize", "retrain", "index", "score"]),
    (None, "train", ["train", "featurize", "retrain", "index", "score"]),
    (None, "retrain", ["retrain", "index", "score"]),
    (None, "score", ["score"]),
    (None, "validate", ["validate"]),
    ("featurize", None, ["featurize"]),
    ("validate", None, ["validate"])])
def test_selected_stages(only, start, expected):
    assert [s.name for s in selected(only, start)] == expected


def test_stage_run_binds_the_stage_and_its_summary(monkeypatch):
    cfg, paths = load_config(TINY), RunPaths(Path("unused"))
    calls = []

    def featurize(cfg_, paths_, progress, stats):
        calls.append((cfg_, paths_, progress))
        stats["train"] = {"jobs": 0, "rows": 0, "examples": 300, "checkpoints": 2}

    monkeypatch.setattr("pipelines.stages.featurize.stage_featurize", featurize)
    monkeypatch.setattr("pipelines.stages.retrain.stage_retrain", lambda *a: 0)
    line = stage_named("featurize").run(cfg, paths, False)
    assert line == "featurize: train 300 examples x 2 checkpoint(s), 0 shard job(s) run, all reused"
    assert calls == [(cfg, paths, False)]
    assert stage_named("retrain").run(cfg, paths, True) == f"retrain: not needed by {cfg.score.scorer}"


@pytest.mark.parametrize("flags, ran, deleted", [
    ([], list(STAGES), []),
    (["--from", "featurize"], ["featurize", "retrain", "index", "score"],
     ["features-train", "features-query", "airrep", "scorer", "index", "scores", "labels"]),
    (["--from", "index"], ["index", "score"], ["scorer", "index", "scores", "labels"]),
    (["--from", "validate"], ["validate"], []),
    (["--only", "retrain"], ["retrain"], [])])
def test_run_follows_the_stage_table(default_tiny_run, tmp_path, monkeypatch, capsys, flags, ran, deleted):
    """``tda run --from/--only`` runs the stages the table orders and deletes the outputs it names
    (each stage's summary replaced by a recorder that does not run it)."""
    from pipelines.stages import summary

    out = tmp_path / "run"
    shutil.copytree(default_tiny_run, out)
    (out / "airrep").mkdir()
    before = {p.name for p in out.iterdir()}
    assert set(STAGE_OUTPUTS["featurize"] + STAGE_OUTPUTS["index"] + STAGE_OUTPUTS["score"]) <= before
    order = []
    def recorder(name: str):
        return lambda cfg, paths, run: order.append(name) or f"{name}: recorded"

    for stage in STAGE_TABLE:
        monkeypatch.setattr(summary, stage.summary, recorder(stage.name))
    for name in ("write_labels", "print_report"):
        monkeypatch.setattr(f"pipelines.cli.run.{name}", lambda *a: None)
    monkeypatch.setattr("pipelines.cli.html_report.refresh_report", lambda *a: None)
    assert main(["run", str(TINY), "--out", str(out), "--quiet", *flags]) == 0
    assert order == ran
    assert before - {p.name for p in out.iterdir()} == set(deleted)
    printed = capsys.readouterr().out
    assert all(f"  {name}: recorded (" in printed for name in ran)  # the run's summary
