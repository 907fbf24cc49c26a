"""Every code block in the docs (docs/**/*.md and README.md) runs, or at least parses, here.

- ```` ```python ```` blocks run, in page order, in one namespace per page, in a fresh folder
  (blocks of a page build on each other). A block after ``<!-- needs: MODULE -->`` is skipped
  when MODULE is not installed. Blocks after ``<!-- byo:FILE -->`` / ``<!-- hf:FILE -->`` are the
  files of an example project, which ``tests/test_readme_byo.py`` / ``tests/test_readme_hf.py``
  write out and run with every command of the page (:data:`PROJECT_TESTS`).
- ```` ```bash ```` blocks: every ``tda ...`` command is parsed by ``pipelines.cli.main.build_parser()``
  and the config it names loads with its ``--set`` overrides (``pipelines.config.load_config``);
  the commands on ``configs/tiny.yaml`` run (:func:`test_tiny_commands_run`). ``python
  benchmarks/X.py`` lines name an existing script whose ``--help`` parses; other lines (pip, curl,
  the test command) are listed in :data:`NOT_RUN` with the reason.
- ```` ```yaml ```` blocks are configs: their sections and keys exist (``parse_config`` without
  the family checks); one after ``<!-- file: PATH -->`` is a copy of that repository file, kept equal.
- Files cited in backticks (``tda/...``, ``tests/...``, ...) and relative links exist: the docs cite
  files inside the repository only. The generated references (docs/hooks.py) hold every config
  key and every command-line option.
- Output blocks (```` ```text ```` or no language) are not code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")) + ["README.md"]
#: marker prefix -> the test that writes the marked blocks as files and runs the page's commands
PROJECT_TESTS = {"byo": ("docs/own-model.md", "tests/test_readme_byo.py"),
                 "hf": ("docs/huggingface.md", "tests/test_readme_hf.py")}
#: pages whose unmarked Python blocks run in another test's project folder (they read its files)
PYTHON_RUN_ELSEWHERE = {"docs/huggingface.md": "tests/test_readme_hf.py"}
#: pages whose Python blocks take longer than the fast suite allows
SLOW_PAGES: set[str] = set()
#: first word of a command line -> why it is not run here
NOT_RUN = {
    "pip": "installs packages (the set-up commands; CI runs them in .ci/run)",
    "lint-imports": "part of the test command, run by .ci/run",
    "mkdocs": "part of the test command, run by .ci/run",
    "curl": "talks to a running `tda serve` (tests/test_serve.py checks every endpoint)",
    "pytest": "the test command itself, run by .ci/run",
}

@contextlib.contextmanager
def inside(folder: Path):
    """Run the body with ``folder`` as the working directory."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


FENCE = re.compile(r"^( *)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!-- ([\w-]+): ?(\S+) -->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int
    lang: str
    text: str
    marker: tuple[str, str] | None  # (prefix, value) of a ``<!-- prefix:value -->`` line right above


def page_blocks(page: str) -> list[Block]:
    """Every fenced block of ``page`` (a path relative to the repository), in order."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group(1), i
        i += 1
        while i < len(lines) and lines[i].rstrip() != f"{indent}```":
            i += 1
        text = "\n".join(line[len(indent):] for line in lines[start + 1: i]) + "\n"
        above = MARKER.match(lines[start - 1]) if start else None
        blocks.append(Block(page, start + 1, m.group(2), text, above.groups() if above else None))
        i += 1
    return blocks


def project_files(page: str) -> dict[str, str]:
    """``{file name: text}`` of the example-project blocks of ``page`` (``<!-- byo:NAME -->``)."""
    return {b.marker[1]: b.text for b in page_blocks(page) if b.marker and b.marker[0] in PROJECT_TESTS}


def python_blocks(page: str) -> list[Block]:
    """The Python blocks of ``page`` that run as code (not the files of an example project)."""
    return [b for b in page_blocks(page) if b.lang == "python" and not (b.marker and b.marker[0] in PROJECT_TESTS)]


def installed(module: str) -> bool:
    """Whether ``module`` is an installed package (not a file of this repository that shadows it on
    ``sys.path``, such as ``benchmarks/quanda.py`` once a test has put ``benchmarks/`` there)."""
    spec = importlib.util.find_spec(module)
    return spec is not None and ROOT not in Path(spec.origin or ROOT).resolve().parents


def run_page_python(page: str, folder: Path) -> dict:
    """Run the Python blocks of ``page`` in order in one namespace, in ``folder``; the namespace."""
    namespace: dict = {"__name__": "__docs__"}
    with inside(folder):
        for block in python_blocks(page):
            if block.marker and block.marker[0] == "needs" and not installed(block.marker[1]):
                print(f"{page}:{block.line}: skipped, needs {block.marker[1]} (not installed)")
                continue
            exec(compile(block.text, f"{page}:{block.line}", "exec"), namespace)
    return namespace


def _python_pages() -> list:
    pages = [p for p in PAGES if python_blocks(p) and p not in PYTHON_RUN_ELSEWHERE]
    return [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in pages]


@pytest.mark.parametrize("page", _python_pages())
def test_python_blocks_run(page: str, tmp_path: Path) -> None:
    run_page_python(page, tmp_path)


def test_pages_run_elsewhere_are_run_there() -> None:
    for prefix, (page, test) in PROJECT_TESTS.items():
        assert project_files(page), f"{page} has no <!-- {prefix}:FILE --> blocks"
        assert page in (ROOT / test).read_text(), f"{test} does not read {page}"
    for page, test in PYTHON_RUN_ELSEWHERE.items():
        assert "run_page_python" in (ROOT / test).read_text() and page in (ROOT / test).read_text()


def commands(block: Block) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split at
    ``&&`` and ``;``; leading ``time`` / ``nice -n N`` removed."""
    text = block.text.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&"):
                out += [_strip_wrappers(argv)] if argv else []
                argv = []
            else:
                argv.append(token)
    return out


def _strip_wrappers(argv: list[str]) -> list[str]:
    while argv and argv[0] in ("time", "nice"):
        argv = argv[3:] if argv[0] == "nice" and argv[1:2] == ["-n"] else argv[1:]
    return argv


def bash_commands(page: str) -> list[tuple[Block, list[str]]]:
    return [(b, argv) for b in page_blocks(page) if b.lang in ("bash", "sh", "shell") for argv in commands(b)]


def parse_tda(argv: list[str]):
    """``build_parser().parse_args`` of a ``tda ...`` line; ``None`` for ``--help`` / ``--version``."""
    from pipelines.cli.main import build_parser

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            assert exc.code == 0, f"`{shlex.join(argv)}` does not parse"
            return None


def check_tda_line(page: str, argv: list[str], tmp_path: Path) -> None:
    """The line parses and the config it names loads with its overrides."""
    from pipelines.config import load_config, parse_config

    args = parse_tda(argv)
    config = getattr(args, "config", None)
    if config is None:
        return
    files = project_files(page)
    if config in files:  # the example project's config: its keys (its files exist once the project runs)
        parse_config(yaml.safe_load(files[config]), args.set, base=tmp_path, check=False)
        return
    assert (ROOT / config).is_file(), f"{page}: `{shlex.join(argv)}` names {config}, which is not in the repository"
    with inside(ROOT):
        load_config(config, args.set)


def check_python_line(page: str, argv: list[str]) -> str | None:
    """``python FILE ...``: a benchmark script in the repository (returned, for the --help check)
    or a file of the page's example project."""
    if argv[1:3] == ["-m", "pytest"]:
        return None
    script = argv[1]
    if script in project_files(page):
        return None
    assert script.startswith("benchmarks/") and (ROOT / script).is_file(), f"{page}: {shlex.join(argv)}"
    return script


@pytest.mark.parametrize("page", [p for p in PAGES if bash_commands(p)])
def test_bash_commands_parse(page: str, tmp_path: Path) -> None:
    for block, argv in bash_commands(page):
        where = f"{page}:{block.line}: {shlex.join(argv)}"
        if argv[0] == "tda":
            check_tda_line(page, argv, tmp_path)
        elif argv[0] == "python":
            check_python_line(page, argv)
        else:
            assert argv[0] in NOT_RUN, f"{where}: an unknown command; run it in a test or list it in NOT_RUN"


def test_benchmark_scripts_named_in_the_docs_parse_help() -> None:
    scripts = sorted({s for p in PAGES for b, argv in bash_commands(p) if argv[0] == "python"
                      for s in [check_python_line(p, argv)] if s})
    runner = ("import runpy, sys, io, contextlib\nsys.path.insert(0, 'benchmarks')\n"
              "for script in sys.argv[1:]:\n    sys.argv = [script, '--help']\n"
              "    try:\n        with contextlib.redirect_stdout(io.StringIO()) as out:\n"
              "            runpy.run_path(script, run_name='__main__')\n"
              "    except SystemExit as exc:\n        assert exc.code == 0 and 'usage' in out.getvalue(), script\n"
              "    else:\n        raise AssertionError(f'{script} --help did not exit')\n")
    result = subprocess.run([sys.executable, "-c", runner, *scripts], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_command_not_run_is_one_the_docs_use() -> None:
    """:data:`NOT_RUN` holds no stale entry: each command it excuses appears in some docs line."""
    names = {"pytest" if argv[1:3] == ["-m", "pytest"] else argv[0] for p in PAGES for _, argv in bash_commands(p)}
    assert set(NOT_RUN) <= names, f"NOT_RUN lists commands no page uses: {sorted(set(NOT_RUN) - names)}"


def tiny_lines(page: str) -> list[list[str]]:
    """The ``tda`` commands of ``page`` on ``configs/tiny.yaml``, and the ``tda query`` / ``tda
    report`` commands on the run folders they make, in order."""
    made, lines = set(), []
    for _, argv in bash_commands(page):
        args = parse_tda(argv) if argv[0] == "tda" else None
        if args is not None and getattr(args, "config", None) == "configs/tiny.yaml":
            made.add(args.out or "runs/tiny")
            lines.append(argv)
        elif args is not None and args.command in ("query", "report") and args.run in made:
            lines.append(argv)
    return lines


@pytest.mark.parametrize("page", [p for p in PAGES if tiny_lines(p)])
def test_tiny_commands_run(page: str, tmp_path: Path, capsys) -> None:
    """The commands on the tiny config run as written, in a fresh folder (``configs/`` beside it)."""
    from pipelines.cli.main import main

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    with inside(tmp_path):
        for argv in tiny_lines(page):
            assert main(argv[1:]) == 0, f"{page}: `{shlex.join(argv)}` failed: {capsys.readouterr().err[-2000:]}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "yaml" for b in page_blocks(p))])
def test_yaml_blocks_are_configs(page: str, tmp_path: Path) -> None:
    from pipelines.config import parse_config

    for block in page_blocks(page):
        if block.lang == "yaml":
            parse_config(yaml.safe_load(block.text), base=tmp_path, check=False)
        if block.marker and block.marker[0] == "file":  # a copy of a repository file, kept whole
            assert block.text == (ROOT / block.marker[1]).read_text(), f"{page}:{block.line} differs from {block.marker[1]}"


#: repository paths cited in backticks: they must exist (docs cite files inside the repository only)
CITED = re.compile(r"`((?:tda|pipelines|stores|tests|benchmarks|configs|docs)/[\w./-]*)`")


@pytest.mark.parametrize("page", PAGES)
def test_cited_files_exist(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = [p for p in CITED.findall(text) if not (ROOT / p).exists()]
    links = re.findall(r"\]\(((?!https?:|#|mailto:)[^)#\s]+)", text)
    missing += [link for link in links if not ((ROOT / page).parent / link).exists()]
    assert not missing, f"{page} cites {missing}, which are not in the repository"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_has_every_field_of_every_config_dataclass() -> None:
    """Every dataclass of the config modules (and each family's ``model.options``) is rendered,
    with every field as ``section.key``."""
    import dataclasses
    import inspect

    import pipelines.spec.schema
    import pipelines.spec.workflows
    import pipelines.spec.options

    hooks = _hooks()
    page = hooks.on_page_markdown(hooks.CONFIG_MARKER)
    rendered = {cls for _, _, cls, _ in hooks.config_sections()}
    for module in (pipelines.spec.schema, pipelines.spec.workflows, pipelines.spec.options):
        for _, cls in inspect.getmembers(module, dataclasses.is_dataclass):
            if cls.__module__ == module.__name__:
                assert cls in rendered, f"{cls.__name__} ({module.__name__}) is not in docs/configs.md"
    for title, prefix, cls, _ in hooks.config_sections():
        for f in dataclasses.fields(cls):
            nested = dataclasses.is_dataclass(hooks._default(f))
            assert nested or f"`{prefix}{f.name}`" in page, f"{prefix}{f.name} is missing from docs/configs.md"
    assert hooks.CONFIG_MARKER in (ROOT / "docs" / "configs.md").read_text()


def test_commands_reference_has_every_subcommand_and_option() -> None:
    from pipelines.cli.main import build_parser

    hooks = _hooks()
    page = hooks.on_page_markdown(hooks.COMMANDS_MARKER)
    for name, (sub, _) in hooks.subcommands(build_parser()).items():
        assert f"## `tda {name}`" in page
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings or [action.dest]:
                assert f"`{option}`" in page, f"tda {name} {option} is missing from docs/commands.md"
    assert hooks.COMMANDS_MARKER in (ROOT / "docs" / "commands.md").read_text()


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """``.ci/run`` ends with the README's second set-up command (the test command), verbatim."""
    readme = [b.text.strip() for b in page_blocks("README.md") if b.lang == "bash"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == readme[1] and "mkdocs build --strict" in ci
