"""MkDocs hook: the generated parts of the docs, rendered from the code so they cannot drift.

- ``<!-- generated: config-reference -->`` (docs/configs.md) becomes a table per config section
  with every field of the config dataclasses (``pipelines/spec/schema.py``,
  ``pipelines/spec/workflows.py``, ``pipelines/spec/options.py`` and each model family's
  ``model.options``): its type, default and the ``# comment`` that follows it in the source.
- ``<!-- generated: commands-reference -->`` (docs/commands.md) becomes every ``tda``
  subcommand with its usage and arguments, read from ``pipelines.cli.main.build_parser()``.

``tests/test_docs.py`` imports this file and checks that every field and every option appears.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
from typing import Any, NamedTuple

CONFIG_MARKER = "<!-- generated: config-reference -->"
COMMANDS_MARKER = "<!-- generated: commands-reference -->"


class FieldDoc(NamedTuple):
    """One config key as the page shows it."""

    name: str
    type: str
    default: Any
    comment: str


def field_docs(cls: type) -> tuple[list[FieldDoc], list[tuple[str, str]]]:
    """The fields of dataclass ``cls`` with the trailing ``# comment`` of each, and the
    comment-only lines of its body as ``(first field they introduce, text)``."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[str, str] = {}
    notes: list[tuple[str, str]] = []
    pending: list[str] = []  # comment-only lines waiting for the field they introduce
    current: str | None = None
    names = {f.name for f in dataclasses.fields(cls)}
    for line in source.splitlines():
        stripped = line.strip()
        head = stripped.split(":", 1)[0].strip()
        if line.startswith("    ") and not line.startswith("     ") and head in names and ":" in stripped:
            current = head
            comments[head] = _trailing_comment(stripped)
            if pending:
                notes.append((head, " ".join(pending)))
                pending = []
        elif stripped.startswith("#") and line.startswith("    ") and current is not None:
            text = stripped.lstrip("#").strip()
            if text.startswith("("):  # a continuation of the field above
                comments[current] = f"{comments[current]} {text}".strip()
            else:
                pending.append(text)
        elif stripped.startswith("def "):
            break
    docs = [FieldDoc(f.name, _type_name(f.type), _default(f), comments.get(f.name, ""))
            for f in dataclasses.fields(cls)]
    return docs, notes


def _trailing_comment(line: str) -> str:
    """The ``# comment`` of one line of code (a ``#`` inside a string is not one)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    found = [t.string for t in tokens if t.type == tokenize.COMMENT]
    return found[0].lstrip("#").strip() if found else ""


def _plain(doc: str) -> str:
    """A docstring as one markdown paragraph: Sphinx roles (``:mod:`x```) become code spans."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(doc.split()))


def _type_name(hint: Any) -> str:
    return hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell(text: str) -> str:
    """Markdown table cell outside a code span: pipes escaped (inside code spans they need not be)."""
    return text.replace("|", "\\|")


def _yaml(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def config_sections() -> list[tuple[str, str, type, str]]:
    """``(title, key prefix, dataclass, when)`` of every config section, in page order."""
    from pipelines.families import registered
    from pipelines.spec.schema import RunConfig
    from pipelines.spec.options import OPTION_TYPES

    sections: list[tuple[str, str, type, str]] = [("Top level", "", RunConfig, "")]
    for f in dataclasses.fields(RunConfig):
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            sections.append((f"`{f.name}`", f"{f.name}.", f.type, ""))
        elif dataclasses.is_dataclass(_default(f)):
            sections.append((f"`{f.name}`", f"{f.name}.", type(_default(f)), ""))
    for scorer, kind in OPTION_TYPES.items():
        sections.append((f"`score.options` of `{scorer}`", "score.options.", kind, f"with `score.scorer: {scorer}`"))
    for name, family in sorted(registered().items()):
        if family.options_type is not None:
            sections.append((f"`model.options` of the `{name}` family", "model.options.", family.options_type,
                             f"with `model.family: {name}`"))
    return sections


def render_section(title: str, prefix: str, cls: type, when: str) -> str:
    """One section's heading, docstring, notes and table of keys."""
    docs, notes = field_docs(cls)
    if prefix == "":  # the top level lists only its plain keys; each section has its own table
        docs = [d for d in docs if _yaml(d.default) != "(section)"]
    out = [f"### {title}", ""]
    doc = inspect.getdoc(cls) or ""
    if doc:
        out += [f"{cls.__name__}: " + _plain(doc), ""]
    if when:
        out += [f"Read {when}.", ""]
    out += [f"From `{prefix}{head}` on: {text}" for head, text in notes] + ([""] if notes else [])
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for d in docs:
        out.append(f"| `{prefix}{d.name}` | `{d.type}` | `{_yaml(d.default)}` | {_cell(d.comment)} |")
    return "\n".join(out) + "\n"


def render_configs() -> str:
    """The whole generated config reference (markdown)."""
    return "\n".join(render_section(*s) for s in config_sections())


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _argument_row(action: argparse.Action) -> str:
    name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    help_text = (action.help or "").replace("%(default)s", str(action.default))
    extras = []
    if action.choices is not None and not isinstance(action.choices, dict):
        extras.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
            and "default" not in help_text:
        extras.append(f"default `{action.default}`")
    if action.nargs in ("+", "*"):
        extras.append("several values allowed")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in help_text:
        extras.append("repeatable")
    if action.required and action.option_strings:
        extras.append("required")
    text = help_text + (f" ({'; '.join(extras)})" if extras else "")
    return f"| {name} | {_cell(text)} |"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """``{name: (subparser, one-line help)}`` of ``tda``'s subcommands."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in action._choices_actions}
    return {name: (sub, helps.get(name, "")) for name, sub in action.choices.items()}


def render_commands() -> str:
    """Every ``tda`` subcommand: usage and a table of its arguments (markdown)."""
    from pipelines.cli.main import build_parser

    parser = build_parser()
    out = ["`tda --version` prints the installed version; `tda COMMAND --help` prints what follows for one command.", ""]
    for name, (sub, help_text) in subcommands(parser).items():
        out += [f"## `tda {name}`", "", help_text[:1].upper() + help_text[1:] + ".", "", "```text", _usage(sub), "```", ""]
        out += ["| argument | meaning |", "|---|---|"]
        out += [_argument_row(a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None) -> str:
    """MkDocs hook: replace the markers with the generated reference."""
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, render_configs())
    if COMMANDS_MARKER in markdown:
        markdown = markdown.replace(COMMANDS_MARKER, render_commands())
    return markdown
