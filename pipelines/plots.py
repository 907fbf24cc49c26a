"""PNG plots of validation results, written next to the JSON/CSV of the same numbers."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tda.validation import group_predictions


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_lds_table(path: Path, rows: Mapping[str, Mapping[str, Any]]) -> None:
    """CSV with one row per method: mean, ci_low, ci_high, n_undefined (and any extra keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows.values() for k in r})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", *keys])
        for name, r in rows.items():
            w.writerow([name, *[r.get(k, "") for k in keys]])


def plot_lds_bars(path: Path, rows: Mapping[str, Mapping[str, Any]], title: str = "LDS") -> None:
    """Bar chart of mean LDS per method with its bootstrap interval."""
    plt = _plt()
    names = list(rows)
    means = np.array([rows[n]["mean"] for n in names])
    err = np.array([[means[i] - rows[n]["ci_low"], rows[n]["ci_high"] - means[i]] for i, n in enumerate(names)]).T
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.5))
    ax.bar(range(len(names)), means, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("LDS (mean Spearman, 95% CI)")
    ax.set_title(title)
    ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(path: Path, scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, query: int = 0) -> None:
    """Predicted group effect vs measured output over subsets, for one query."""
    plt = _plt()
    pred = group_predictions(scores[query: query + 1], masks)[:, 0]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.scatter(pred, outputs[:, query], s=10)
    ax.set_xlabel("predicted: sum of scores over subset")
    ax.set_ylabel("measured margin after retraining")
    ax.set_title(f"query {query}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_removal(path: Path, removal: Mapping[str, Any]) -> None:
    """Mean change of the margin and flip rate vs k for top/random/bottom removal."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for mode, r in removal["modes"].items():
        axes[0].plot(removal["ks"], r["mean_change"], marker="o", label=mode)
        axes[1].plot(removal["ks"], r["flip_rate"], marker="o", label=mode)
    axes[0].set_ylabel("mean change of margin")
    axes[1].set_ylabel("flip rate")
    for ax in axes:
        ax.set_xlabel("k removed")
        ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_validation(folder: Path, result: Mapping[str, Any], scores: np.ndarray, masks: np.ndarray,
                    outputs: np.ndarray) -> None:
    """All plots of one validation run (needs matplotlib)."""
    rows = {name: r["report"] for name, r in result["scorers"].items()}
    if "lds" in result:  # TRAK's rows name their ridge
        rows.update({f"TRAK {k} (lambda {result['lds'][k]['label']})": result["lds"][k] for k in ("tuned", "configured")})
        rows.pop("trak", None), rows.pop("trak (tuned)", None)
    write_lds_table(folder / "lds.csv", rows)
    plot_lds_bars(folder / "lds.png", rows, "LDS on the reporting fold")
    plot_scatter(folder / "scatter_query0.png", scores, masks, outputs[:, : scores.shape[0]], 0)
    if "removal" in result:
        plot_removal(folder / "removal.png", result["removal"])
