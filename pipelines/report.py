"""Human-readable output: top proponents and opponents of a few queries."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def format_examples(title: str, ids: Sequence[int], scores: Sequence[float], labels: dict[int, int]) -> list[str]:
    lines = [f"    {title}:"]
    for i, s in zip(ids, scores):
        lines.append(f"      train id {int(i):>6}  label {labels.get(int(i), '?')}  score {float(s):+.4e}")
    return lines


def titles(scorer: str, proponents: str, opponents: str) -> tuple[str, str]:
    """Headings of the two lists: RepSim's scores are similarities, not signed effects."""
    if scorer == "repsim":
        return "most similar training examples (RepSim)", "least similar training examples (RepSim)"
    return proponents, opponents


def format_query(query_id: int, query_label: int, predicted: int | str | None, top: dict[str, np.ndarray], row: int,
                 labels: dict[int, int], k: int, scorer: str = "trak") -> str:
    """Block of text for one query: proponents (raise the margin) and opponents (lower it)."""
    head = f"  query id {query_id}  label {query_label}"
    if predicted is not None:
        head += f"  predicted {predicted}"
    lines = [head]
    high, low = titles(scorer, "proponents (training on them raises the query's margin)",
                       "opponents (training on them lowers the query's margin)")
    lines += format_examples(high, top["proponent_ids"][row][:k], top["proponent_scores"][row][:k], labels)
    lines += format_examples(low, top["opponent_ids"][row][:k], top["opponent_scores"][row][:k], labels)
    return "\n".join(lines)
