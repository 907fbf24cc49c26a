"""Human-readable output: top proponents and opponents of a few queries, with class names and texts.

Labels read ``cat (3)`` where the run knows the class names (``data.class_names``, the label
column's ``ClassLabel`` names, or a Hugging Face model's ``id2label``), else the bare id. Texts are
shown whole, wrapped, and cut only at ``chars`` characters (``score.text_chars`` or ``tda query
--chars``) with the count of characters left out. Numpy only: the lean ``tda query`` prints with it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from pipelines.spec.method import find_method

#: width of wrapped texts, indentation included
WRAP_WIDTH = 100


def label_name(label: Any, names: Sequence[str] | None) -> str | None:
    """The name of class ``label`` (None: no names, or a label outside them)."""
    if not names or isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        return None
    return str(names[int(label)]) if 0 <= int(label) < len(names) else None


def label_text(label: Any, names: Sequence[str] | None = None) -> str:
    """``cat (3)`` with a name, ``3`` without, ``?`` for no label."""
    if label is None:
        return "?"
    name = label_name(label, names)
    return str(label) if name is None else f"{name} ({label})"


def predicted_text(pred: tuple[int, float] | None, names: Sequence[str] | None = None) -> str | None:
    """``dog (5) p 0.93`` with a name, ``5 (p 0.93)`` without; None without a prediction."""
    if pred is None:
        return None
    name = label_name(pred[0], names)
    return f"{pred[0]} (p {pred[1]:.2f})" if name is None else f"{name} ({pred[0]}) p {pred[1]:.2f}"


def cut_text(text: str, chars: int | None) -> tuple[str, int]:
    """``text`` cut to ``chars`` characters (None: whole) and how many characters were left out."""
    if chars is None or len(text) <= chars:
        return text, 0
    return text[:chars], len(text) - chars


def text_lines(text: str, chars: int | None, indent: int) -> list[str]:
    """``text`` wrapped at :data:`WRAP_WIDTH` behind ``indent`` spaces and ``| ``, its line breaks kept;
    cut at ``chars`` characters with an ellipsis and the count left out."""
    shown, omitted = cut_text(text, chars)
    prefix = " " * indent + "| "
    lines = []
    for paragraph in (shown + ("\u2026" if omitted else "")).split("\n"):
        lines += textwrap.wrap(paragraph, width=max(20, WRAP_WIDTH - len(prefix))) or [""]
    if omitted:
        lines.append(f"[{omitted} more character{'' if omitted == 1 else 's'} not shown; --chars all shows them]")
    return [prefix + line for line in lines]


def label_fields(label: Any, names: Sequence[str] | None) -> dict[str, Any]:
    """JSON fields of a label: ``label`` as stored (an int for classes) and ``label_name`` (None: no name)."""
    label = label.item() if isinstance(label, np.generic) else label
    return {"label": label, "label_name": label_name(label, names)}


def text_fields(text: str | None, chars: int | None) -> dict[str, Any]:
    """JSON fields of a text: ``text`` (whole, or cut at ``chars`` and ending in an ellipsis) and,
    when cut, ``text_omitted`` (characters left out); empty for no text."""
    if text is None:
        return {}
    shown, omitted = cut_text(text, chars)
    return {"text": shown + "\u2026", "text_omitted": omitted} if omitted else {"text": shown}


def format_examples(title: str, ids: Sequence[int], scores: Sequence[float], labels: dict[int, int],
                    names: Sequence[str] | None = None, texts: Mapping[int, str] | None = None,
                    chars: int | None = None) -> list[str]:
    """A titled list of training examples: id, label (with its name) and score, then each one's text."""
    lines = [f"    {title}:"]
    for i, s in zip(ids, scores):
        label = label_text(labels.get(int(i)), names)
        lines.append(f"      train id {int(i):>6}  label {label}  score {float(s):+.4e}")
        if texts and int(i) in texts:
            lines += text_lines(texts[int(i)], chars, 8)
    return lines


def titles(scorer: str, proponents: str, opponents: str) -> tuple[str, str]:
    """Headings of the two lists: a similarity method's (RepSim's) scores are not signed effects."""
    method = find_method(scorer)
    if method is not None and method.similarity:
        return (f"most similar training examples ({method.title})",
                f"least similar training examples ({method.title})")
    return proponents, opponents


def similarity_note(scorer: str) -> str:
    """``"; RepSim scores are similarities, not signed effects"`` for a similarity method, else ``""``."""
    method = find_method(scorer)
    return f"; {method.title} scores are similarities, not signed effects" if method and method.similarity else ""


def format_query(query_id: int, query_label: Any, predicted: int | str | None, top: dict[str, np.ndarray], row: int,
                 labels: dict[int, int], k: int, scorer: str = "trak", names: Sequence[str] | None = None,
                 texts: Mapping[int, str] | None = None, query_text: str | None = None,
                 chars: int | None = None) -> str:
    """Block of text for one query: its label (``cat (3)`` with ``names``), prediction and text, then
    proponents (raise the margin) and opponents (lower it) with their labels and texts."""
    head = f"  query id {query_id}  label {label_text(query_label, names)}"
    if predicted is not None:
        head += f"  predicted {predicted}"
    lines = [head] + ([] if query_text is None else text_lines(query_text, chars, 4))
    high, low = titles(scorer, "proponents (training on them raises the query's margin)",
                       "opponents (training on them lowers the query's margin)")
    lines += format_examples(high, top["proponent_ids"][row][:k], top["proponent_scores"][row][:k], labels, names,
                             texts, chars)
    lines += format_examples(low, top["opponent_ids"][row][:k], top["opponent_scores"][row][:k], labels, names,
                             texts, chars)
    return "\n".join(lines)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: columns as wide as their widest cell, the first right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))]
    out = []
    for row in cells:
        parts = [row[0].rjust(widths[0])] + [v.ljust(w) for v, w in zip(row[1:], widths[1:])]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)
