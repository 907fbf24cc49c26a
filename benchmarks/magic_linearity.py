"""Where MAGIC's linear prediction holds: a ReLU momentum-SGD recipe (issue 25, item 2).

Recipe (the held-out one of issue 25): an MLP 784-H-10 on the first n = 1,000 shipped MNIST
training images, SGD with momentum 0.9, lr 0.05, weight decay 1e-3, batch 64, constant lr,
40 epochs = 640 steps, float64; f = the classification margin of the first m test images.
Every retraining keeps the run's seed and batch order; dropped rows get weight 0.

(a) MAGIC's column d f / d w_i against finite differences ``(f(1) - f(1 - eps e_i)) / eps`` for a
    few training rows at eps = 1e-6 .. 1 (1 = removal), ReLU and GELU: Pearson over queries, and the size ratio
    ||FD|| / ||MAGIC||.
(b) Small-drop LDS of MAGIC against drop fraction (0.1%, 1%, 5%), activation (ReLU, GELU),
    lr (0.05, 0.01) and steps (640, 160), one factor at a time around the recipe.
(c) Linearity of the retrained outcomes themselves: each subset is retrained again with its
    dropped rows at weight 0.5; twice that change against the drop's change (Pearson, slope,
    and the LDS of twice the half change as a predictor). Where that is far from 1, no
    first-order attribution can predict the drop.
(d) Attempts to reach the drops with a derivative: MAGIC through the same run with ReLU's kinks
    smoothed in the reverse pass (softplus derivatives), and the mean of the exact derivatives
    at S random 1% drop points instead of at w = 1.

Models are trained S at a time with ``torch.func.vmap`` over their weight vectors (same plan,
same steps; float64, so batching changes nothing visible). Results are cached per chunk under
--cache, so a killed run resumes. The defaults (16 queries, 40 subsets, 4 drop points) take
about 25 min on one busy CPU thread.

    python benchmarks/magic_linearity.py
    python benchmarks/magic_linearity.py --queries 8 --subsets 20 --smooth 2     # about 8 min
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tda.data.loading import load_mnist, mnist_collate  # noqa: E402
from tda.scorers.magic import SGDRecipe, magic_scores  # noqa: E402
from tda.scorers.magic.functional import TrainData, build_model  # noqa: E402
from tda.models.tasks import ClassificationTask  # noqa: E402
from tda.validation import half_weight_linearity, lds, sample_subsets, spearman_columns  # noqa: E402

CACHE = Path.home() / ".cache" / "tda" / "magic-linearity"


class SmoothGradReLU(nn.Module):
    """ReLU in the forward pass, softplus(beta)'s derivatives in the backward: MAGIC through the
    same run with the kinks smoothed (``softplus + (relu - softplus).detach()``)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = nn.functional.softplus(x, beta=self.beta)
        return soft + (torch.relu(x) - soft).detach()


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "relu-sg3": lambda: SmoothGradReLU(3.0),
               "relu-sg10": lambda: SmoothGradReLU(10.0)}


@dataclass(frozen=True)
class Setting:
    """One recipe: activation, learning rate, steps (``steps`` / 16 epochs of batch 64 on 1,000 rows)."""

    act: str = "relu"
    lr: float = 0.05
    steps: int = 640

    def label(self) -> str:
        return f"{self.act}, lr {self.lr:g}, {self.steps} steps"


class Lab:
    """The data, the models and a cache of trained outputs and MAGIC scores."""

    def __init__(self, n: int, m: int, hidden: int, cache: Path, chunk: int) -> None:
        self.n, self.m, self.hidden, self.cache, self.chunk = n, m, hidden, cache, chunk
        self.train_ds, self.query_ds = load_mnist(None, "train", n), load_mnist(None, "test", m)
        self.task = ClassificationTask()
        self.tag = f"n{n}-m{m}-h{hidden}"

    def model_fn(self, s: Setting):
        act = ACTIVATIONS[s.act]
        return lambda: nn.Sequential(nn.Linear(784, self.hidden), act(), nn.Linear(self.hidden, 10)).double()

    def recipe(self, s: Setting) -> SGDRecipe:
        per_epoch = -(-self.n // 64)
        if s.steps % per_epoch:
            raise SystemExit(f"--steps must be a multiple of {per_epoch} (steps per epoch), got {s.steps}")
        return SGDRecipe(epochs=s.steps // per_epoch, lr=s.lr, momentum=0.9, weight_decay=1e-3, batch_size=64, seed=0)

    def _path(self, kind: str, s: Setting, payload: bytes) -> Path:
        digest = hashlib.sha256(payload).hexdigest()[:20]
        return self.cache / self.tag / f"{kind}-{s.act}-lr{s.lr:g}-t{s.steps}-{digest}.npy"

    def outputs(self, s: Setting, weights: np.ndarray) -> np.ndarray:
        """(K, m) margins of K runs of ``s`` with data weights (K, n), trained ``chunk`` at a time."""
        parts = []
        for lo in range(0, len(weights), self.chunk):
            w = np.ascontiguousarray(weights[lo: lo + self.chunk], dtype=np.float64)
            path = self._path("out", s, w.tobytes())
            if not path.is_file():
                save(path, self._train(s, torch.from_numpy(w)))
            parts.append(np.load(path))
        return np.concatenate(parts)

    def _train(self, s: Setting, w: torch.Tensor) -> np.ndarray:
        recipe = self.recipe(s)
        fm = build_model(self.model_fn(s), recipe.seed)
        data, queries = TrainData(self.train_ds, mnist_collate, fm, "training"), TrainData(
            self.query_ds, mnist_collate, fm, "query")
        plan, k = recipe.plan(self.n), len(w)
        state = tuple(tuple(x.expand(k, *x.shape).clone() for x in part) for part in recipe.init_state(fm.initial))
        with torch.no_grad():
            for t, idx in enumerate(plan):
                batch = data.batch(idx)
                state = torch.func.vmap(lambda st, wb: recipe.step(fm, st, batch, wb, t, len(plan))[0])(state, w[:, idx])
            out = torch.func.vmap(lambda p: self.task.output(fm.call(p), queries.tensors))(state[0])
        if not torch.isfinite(out).all():
            raise SystemExit(f"training diverged under {s.label()}")
        return out.numpy()

    def magic(self, s: Setting, weights: np.ndarray | None = None) -> np.ndarray:
        """(m, n) MAGIC scores of ``s``, the derivative at ``weights`` (None: at w = 1)."""
        w = np.ones(self.n) if weights is None else np.asarray(weights, dtype=np.float64)
        path = self._path("magic", s, w.tobytes())
        if not path.is_file():
            save(path, magic_scores(self.model_fn(s), self.train_ds, self.query_ds, mnist_collate, self.recipe(s),
                                    weights=torch.from_numpy(w), query_batch=self.m))
        return np.load(path)


def save(path: Path, array: np.ndarray) -> None:
    """Atomic write (a killed run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def finite_differences(lab: Lab, s: Setting, rows: np.ndarray, eps: list[float]) -> list[str]:
    """Table (a): per eps, Pearson (MAGIC column, FD) and ||FD|| / ||MAGIC|| for each row."""
    tau = lab.magic(s)
    weights = np.ones((len(eps) * len(rows) + 1, lab.n))
    for a, e in enumerate(eps):
        for b, i in enumerate(rows):
            weights[a * len(rows) + b, i] = 1.0 - e
    out = lab.outputs(s, weights)
    ref = out[-1]
    lines = [f"| weight change | {' | '.join(f'row {i}' for i in rows)} |", "|---" * (len(rows) + 1) + "|"]
    for a, e in enumerate(eps):
        cells = []
        for b, i in enumerate(rows):
            fd = (ref - out[a * len(rows) + b]) / e
            r = np.corrcoef(fd, tau[:, i])[0, 1]
            cells.append(f"{r:.4f} ({np.linalg.norm(fd) / np.linalg.norm(tau[:, i]):.2g}x)")
        lines.append(f"| {e:g}{' (removal)' if e == 1 else ''} | {' | '.join(cells)} |")
    return lines


def drop_study(lab: Lab, s: Setting, drop: float, subsets: int, seed: int = 0) -> dict:
    """(b) and (c) for one setting and drop fraction: outcomes at weight 0 and 0.5, MAGIC's LDS."""
    masks = sample_subsets(lab.n, subsets, 1.0 - drop, seed)
    keep = masks.astype(np.float64)
    out = lab.outputs(s, np.concatenate([keep, keep + 0.5 * ~masks, np.ones((1, lab.n))]))
    dropped, half, ref = out[:subsets], out[subsets: 2 * subsets], out[-1]
    tau = lab.magic(s)
    full_change = dropped - ref
    predicted = -(~masks).astype(np.float64) @ tau.T  # (J, m) first-order change of the drop
    slope = float((predicted * full_change).sum() / (predicted ** 2).sum())
    return {"masks": masks, "dropped": dropped, "ref": ref, "lds": lds(tau, masks, dropped),
            "magic_slope": slope, "linearity": half_weight_linearity(ref, dropped, half),
            "half_lds": float(np.nanmean(spearman_columns(2 * (half - ref), full_change))),
            "magic_vs_half": float(np.nanmean(spearman_columns(predicted, half - ref)))}


def lds_table(lab: Lab, rows: list[tuple[Setting, float]], subsets: int) -> tuple[list[str], dict]:
    """Tables (b) + (c): one line per (setting, drop fraction)."""
    lines = ["| recipe | drop | MAGIC LDS [95% CI] | MAGIC slope | LDS of MAGIC vs half-weight change | "
             "2 x half-weight change vs drop: Pearson | slope | LDS (ceiling) |", "|---" * 8 + "|"]
    studies = {}
    for s, drop in rows:
        start = time.time()
        st = studies[(s, drop)] = drop_study(lab, s, drop, subsets)
        r, lin = st["lds"], st["linearity"]
        lines.append(f"| {s.label()} | {drop:.1%} | {r.mean:.3f} [{r.ci_low:.2f}, {r.ci_high:.2f}] | "
                     f"{st['magic_slope']:.2f} | {st['magic_vs_half']:.3f} | {lin.pearson:.3f} | {lin.slope:.2f} | "
                     f"{st['half_lds']:.3f} |")
        print(lines[-1], f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    return lines, studies


def smoothing_table(lab: Lab, s: Setting, studies: dict, drops: list[float], points: int) -> list[str]:
    """(d): LDS of smoothed derivatives on the drop subsets of (b): ReLU's kinks smoothed in the
    reverse pass, and the mean of the exact derivatives at S random 1% drop points."""
    variants = [("exact, at w = 1 (MAGIC)", lambda: lab.magic(s)),
                ("smooth-gradient ReLU, softplus beta 10", lambda: lab.magic(replace(s, act="relu-sg10"))),
                ("smooth-gradient ReLU, softplus beta 3", lambda: lab.magic(replace(s, act="relu-sg3")))]
    if points:
        probes = ~sample_subsets(lab.n, points, 0.99, seed=10_000)
        variants.append((f"mean of exact derivatives at {points} random 1% drop points",
                         lambda: np.mean([lab.magic(s, 1.0 - probes[p]) for p in range(points)], axis=0)))
    lines = [f"| derivative | {' | '.join(f'LDS at drop {d:.1%}' for d in drops)} |", "|---" * (len(drops) + 1) + "|"]
    for name, make in variants:
        tau = make()
        cells = [f"{lds(tau, studies[(s, d)]['masks'], studies[(s, d)]['dropped']).mean:.3f}" for d in drops]
        lines.append(f"| {name} | {' | '.join(cells)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=16, help="test images measured (m)")
    ap.add_argument("--subsets", type=int, default=40, help="drop subsets per cell (each retrained twice)")
    ap.add_argument("--smooth", type=int, default=4, help="drop points averaged in (d) (0: that row left out)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--fd-rows", type=int, default=4, help="training rows in (a)")
    ap.add_argument("--chunk", type=int, default=21, help="models trained together (vmap)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    lab = Lab(1000, args.queries, args.hidden, args.cache, args.chunk)
    base = Setting()
    rows = np.random.default_rng(0).choice(lab.n, args.fd_rows, replace=False)
    eps = [1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0]
    print(f"## MAGIC on MNIST n=1000, MLP 784-{args.hidden}-10, SGD momentum 0.9, wd 1e-3, batch 64, float64; "
          f"{args.queries} queries, {args.subsets} subsets per cell\n")
    for s in (base, replace(base, act="gelu")):
        print(f"### (a) MAGIC's column vs finite differences, {s.label()}: Pearson over queries (||FD|| / ||MAGIC||)\n")
        print("\n".join(finite_differences(lab, s, rows, eps)) + "\n", flush=True)
    cells = [(base, 0.001), (base, 0.01), (base, 0.05), (replace(base, act="gelu"), 0.01),
             (replace(base, act="gelu"), 0.001),
             (replace(base, act="gelu"), 0.05), (replace(base, lr=0.01), 0.01), (replace(base, steps=160), 0.01),
             (replace(base, lr=0.01, steps=160), 0.01)]
    lines, studies = lds_table(lab, cells, args.subsets)
    print("### (b, c) Small-drop LDS and the linearity of the retrained outcomes\n")
    print("\n".join(lines) + "\n", flush=True)
    print(f"### (d) Smoothed derivatives, {base.label()}: LDS on the subsets of (b)\n")
    print("\n".join(smoothing_table(lab, base, studies, [0.001, 0.01, 0.05], args.smooth)) + "\n")
    print(f"total {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
