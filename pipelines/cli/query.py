"""``tda query --run DIR --example ID``: top-k proponents and opponents of a run's examples;
``tda query --run DIR --list``: the stored ids with their labels and predictions.

Labels show their class names and text data their texts (whole, wrapped; cut at ``--chars`` or
``score.text_chars``), in the text output and in ``--json``.

Two paths give the same answer. The lean one (:mod:`pipelines.query.lean`) reads the fitted
state, the stored features, the index and the recorded labels, names and texts with numpy and
faiss and never imports torch; the full one (:func:`full_answer`) builds the scorer through the
registry and the family, reads the data sets for labels, names and texts, and answers what the
lean one cannot (or raises the error naming the fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from tda.errors import QueryError

from pipelines.layout import RunPaths
from pipelines.query.lean import Answer, NotLean, lean_answer, load_predictions, recorded_labels
from pipelines.report import format_query, format_table, label_fields, label_name, label_text, predicted_text, text_fields
from pipelines.run_folder import RunLabels

#: characters of a text in the ``--list`` table
LIST_TEXT_CHARS = 60

logger = logging.getLogger(__name__)


def full_answer(paths: RunPaths, examples: list[int], split: str, k: int) -> Answer:
    """The answer through the scorer registry and the family (imports torch and the model code):
    the run loaded as ``tda serve`` loads it (:func:`pipelines.query.state.load_full`)."""
    from pipelines.query.state import load_full

    t0 = time.time()
    run, ids, vectors = load_full(paths, examples, split)
    ans = run.answer(ids, split, k, vectors)  # every example in one search: the index is loaded once
    ans.elapsed = time.time() - t0
    return ans


def answer(paths: RunPaths, examples: list[int], split: str, k: int) -> Answer:
    """The lean answer where it can be given, else the full one."""
    try:
        return lean_answer(paths, examples, split, k)
    except NotLean as exc:
        logger.info("tda query: full path (%s)", exc)
        return full_answer(paths, examples, split, k)


def print_answer(ans: Answer, k: int) -> None:
    """The answer as text: per example its label, prediction and text, then the proponents and
    opponents with their labels, scores and texts."""
    for row, example in enumerate(ans.ids):
        pred = (ans.predicted or {}).get(int(example))
        print(format_query(int(example), ans.qlabels.get(int(example), "?"), predicted_text(pred, ans.names), ans.top,
                           row, ans.labels, k, ans.scorer, names=ans.names, texts=ans.texts,
                           query_text=(ans.qtexts or {}).get(int(example)), chars=ans.chars))
    print(f"  ({ans.elapsed * 1000:.0f} ms in all, {ans.search * 1000:.1f} ms searching; {len(ans.ids)} queries, "
          f"{ans.n_index} indexed training examples, {ans.kind} index)")


def parse_chars(value: str | None) -> int | None | str:
    """``--chars``: a positive number of characters, ``all`` (None: whole texts), or not given
    (``"config"``: ``score.text_chars`` decides)."""
    if value is None:
        return "config"
    if value.strip().lower() == "all":
        return None
    try:
        chars = int(value)
    except ValueError:
        chars = 0
    if chars < 1:
        raise QueryError(f"--chars takes a positive number of characters or 'all', got {value!r}")
    return chars


def run_labels(paths: RunPaths) -> RunLabels:
    """Labels, class names and texts of a finished run: recorded (numpy only), else read from the data."""
    from pipelines.run_folder import check_complete, recorded_config

    check_complete(paths, {}, f"`tda run CONFIG --out {paths.root}`")
    try:
        return recorded_labels(paths)
    except NotLean as exc:
        logger.info("tda query --list: labels from the data (%s)", exc)
        from pipelines.run_folder import dataset_labels

        return dataset_labels(recorded_config(paths), paths)


def stored_examples(paths: RunPaths, split: str, chars: int | None | str = "config") -> list[dict[str, Any]]:
    """Every stored example of ``split`` in the feature store's order: id, label (and name), the
    prediction of a query (classifiers) and its text (text data, cut at ``chars``; ``"config"``:
    at ``score.text_chars``)."""
    from stores import FeatureStore

    from pipelines.run_folder import recorded_config

    if chars == "config":
        chars = recorded_config(paths, check=False).score.text_chars
    meta = run_labels(paths)
    preds = (load_predictions(paths) or {}) if split == "query" else {}
    labels, texts, rows = meta.labels[split], meta.texts.get(split) or {}, []
    for i in FeatureStore.open(paths.store(split)).ids().tolist():
        row = {"id": int(i), **label_fields(labels.get(int(i)), meta.names)}
        if int(i) in preds:
            row["predicted"], row["p_predicted"] = preds[int(i)]
            row["predicted_name"] = label_name(row["predicted"], meta.names)
        rows.append({**row, **text_fields(texts.get(int(i)), chars)})
    return rows


def format_listing(rows: list[dict[str, Any]], split: str, root: Path) -> str:
    """``--list`` as a table: id, label, predicted class and probability, the start of the text."""
    labels = any(r["label"] is not None for r in rows)  # a language model's examples have none
    preds, texts = any("predicted" in r for r in rows), any("text" in r for r in rows)
    header = ["id"] + (["label"] if labels else []) + (["predicted"] if preds else []) + (["text"] if texts else [])
    table = []
    for r in rows:
        cells = [r["id"]] + ([_named(r["label"], r["label_name"])] if labels else [])
        if preds:
            cells.append(f"{_named(r['predicted'], r['predicted_name'])} p {r['p_predicted']:.2f}" if "predicted" in r
                         else "-")
        if texts:
            text = " ".join(r.get("text", "").split())
            cells.append(text if len(text) <= LIST_TEXT_CHARS else text[:LIST_TEXT_CHARS] + "\u2026")
        table.append(cells)
    return f"{len(rows)} {split} ids stored in {root}:\n" + format_table(header, table)


def _named(label: Any, name: str | None) -> str:
    """``cat (3)`` or ``3`` from a label and its name."""
    return label_text(label) if name is None else f"{name} ({label})"


def new_input_answer(paths: RunPaths, value: str, label: str | None, k: int) -> Answer:
    """The answer for ``--input``: the rows through the run's featurizer (as ``tda serve`` does)."""
    import sys

    from pipelines.query.input import input_rows
    from pipelines.run import datasets_for
    from pipelines.query.state import Service

    service = Service.load(paths)
    cfg = service.run.cfg
    template = datasets_for(cfg, paths)["query"]
    rows = input_rows(value, cfg, template)
    if label is None and cfg.data.label_column in template.column_names:
        print("  (no --label: each input is explained for its predicted class)", file=sys.stderr)
    return service.new_inputs(rows, k, label)


def cmd_query(args: argparse.Namespace) -> int:
    """``tda query``: answer ``--example`` ids (text, ``--json``, ``--html``) or ``--list`` the stored ids."""
    paths = RunPaths(Path(args.run).resolve())
    chars = parse_chars(getattr(args, "chars", None))
    if getattr(args, "list", False):
        if args.example or args.html:
            raise QueryError("--list lists the stored ids; give it without --example and --html")
        rows = stored_examples(paths, args.split, chars)
        print(json.dumps(rows, indent=1) if args.json else format_listing(rows, args.split, paths.root))
        return 0
    if getattr(args, "input", None):
        if args.example:
            raise QueryError("give either --example (stored ids) or --input (a new input), not both")
        ans = new_input_answer(paths, args.input, getattr(args, "label", None), args.k)
    elif not args.example:
        raise QueryError(f"give --example ID (or --list to see the stored ids: `tda query --run {paths.root} --list`, "
                         "or --input FILE|TEXT for a new input)")
    else:
        ans = answer(paths, list(dict.fromkeys(args.example)), args.split, args.k)
    if chars != "config":
        ans.chars = chars
    if args.json:
        print(json.dumps(ans.as_dict(), indent=1))
    else:
        print_answer(ans, args.k)
    if args.html:
        from pipelines.cli.html_report import answer_page

        out = Path(args.html)
        if out.is_dir():
            raise QueryError(f"--html {out} is a folder; name a file, e.g. {out / 'answer.html'}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(answer_page(paths, ans, args.split))
        except OSError as exc:
            raise QueryError(f"cannot write --html {out} ({exc.strerror or exc}); choose a writable file") from exc
        if not args.json:
            print(f"  written to {out}")
    return 0
