"""The automatic ridge where the project's own sets do not go: fewer training examples than k,
two classes, text, a recipe of momentum SGD (issue 25, item 1). Everything in one process,
through the Python API (`tda.Attributor`, its defaults); features and ground truth cached per pair.

Per set: ``M`` models trained on the full training set (seeds 0..M-1) are attributed; the
ground truth is ``S`` random halves, each trained with ``R`` seeds, and the queries' margins
averaged over them (the classic protocol). Queries and subsets are split into a tuning and a
reporting fold (``tda.validation.split_folds``); the best fixed ``lambda_rel`` of the grid is
chosen on the tuning fold and both it and ``auto`` are reported on the reporting fold (LDS,
mean Spearman over queries, with its bootstrap interval). Recipe: a ReLU MLP (one hidden layer
of 128), SGD with momentum 0.9, lr 0.05, weight decay 1e-3, batch 32, ``epochs`` epochs; a CNN
(conv 16 - pool - conv 32 - pool - linear), the same SGD at lr 0.02 for half the epochs; a
one-block transformer over hashed word ids (width 64, 2 heads, 48 tokens, mean-pooled), AdamW
lr 1e-3 for half the epochs.

Sets (``../shared/data``, and Debian's ``dataset-fashion-mnist`` package): MNIST (10 classes),
MNIST 3-vs-8 (binary), Fashion-MNIST (10), CIFAR-2 (binary, pixels / 255), CIFAR-10 (10, the
first 4,000 rows of the shipped npz), SST-2 (binary), QNLI (binary, question and sentence) and
AG News (4 classes); the texts as 2,048 hashed word counts (log1p) for the MLP, as hashed word
ids for the transformer; ``n`` training rows each. ``PAIRS`` lists the set:model:n pairs run by
default; the first eight chose the rule's constants, the rest (``HELD_OUT``) are a check.

    python benchmarks/ridge_regimes.py                          # every pair of PAIRS (hours the first time)
    python benchmarks/ridge_regimes.py --pairs cifar10:cnn:400 --subsets 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

import tda  # noqa: E402
from tda.core.kernel import score_matrix  # noqa: E402
from tda.scorers import TRAKScorer  # noqa: E402
from tda.validation import lds, split_folds  # noqa: E402

GRID = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 1e4]


def _mnist(n: int, m: int, digits: tuple[int, ...] | None, seed: int, root: Path = DATA / "mnist"):
    from tda.data.loading import load_mnist

    out = []
    for split, size in (("train", n), ("test", m)):
        ds = load_mnist(root, split)
        x = np.asarray(ds.with_format("numpy")["image"], np.float32).reshape(len(ds), 28, 28, 1) / 255.0
        y = np.asarray(ds["label"], np.int64)
        keep = np.isin(y, digits) if digits else np.ones(len(y), bool)
        x, y = x[keep], y[keep]
        if digits:
            y = np.searchsorted(np.asarray(digits), y)
        pick = np.random.default_rng(seed).choice(len(y), size, replace=False)
        out += [x[pick], y[pick]]
    return (*out, 2 if digits else 10)


def _cifar2(n: int, m: int, seed: int):
    z = np.load(DATA / "cifar10" / "cifar2_cat_dog_from_jpeg_uint8.npz")
    rng = np.random.default_rng(seed)
    tr, te = rng.choice(len(z["y_train"]), n, replace=False), rng.choice(len(z["y_test"]), m, replace=False)
    return z["x_train"][tr] / np.float32(255), z["y_train"][tr].astype(np.int64), z["x_test"][te] / np.float32(255), \
        z["y_test"][te].astype(np.int64), 2


def _cifar10(n: int, m: int, seed: int):
    """All ten CIFAR-10 classes from the lossless first 4,000 training images (n + m <= 4,000)."""
    z = np.load(DATA / "cifar10" / "cifar10_train_first4000_lossless_convnetjs.npz")
    pick = np.random.default_rng(seed).choice(len(z["y"]), n + m, replace=False)
    x, y = z["x"][pick] / np.float32(255), z["y"][pick].astype(np.int64)
    return x[:n], y[:n], x[n:], y[n:], 10


def _hashed(texts: list[str], width: int = 2048) -> np.ndarray:
    x = np.zeros((len(texts), width), np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            x[i, zlib.crc32(w.encode()) % width] += 1.0
    return np.log1p(x)


def _token_ids(texts: list[str], vocab: int = 2048, length: int = 48) -> np.ndarray:
    """Words hashed to ids 1 .. vocab - 1 (0 pads), cut to ``length``; a tab (pair sets) is id 1."""
    ids = np.zeros((len(texts), length), np.int64)
    for i, t in enumerate(texts):
        words = [w for part in t.lower().split("\t") for w in part.split() + ["\t"]][:-1][:length]
        ids[i, :len(words)] = [1 if w == "\t" else 2 + zlib.crc32(w.encode()) % (vocab - 2) for w in words]
    return ids


def _text(rows: list[tuple[str, str]], n: int, m: int, seed: int):
    names = sorted({label for _, label in rows})
    pick = np.random.default_rng(seed).choice(len(rows), n + m, replace=False)
    x = np.asarray([rows[i][0] for i in pick], dtype=object)
    y = np.asarray([names.index(rows[i][1]) for i in pick], np.int64)
    return x[:n], y[:n], x[n:], y[n:], len(names)


def _sst2(n: int, m: int, seed: int):
    lines = (DATA / "sst2-glue" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]  # label<TAB>sentence
    return _text([(ln.split("\t", 1)[1], ln.split("\t", 1)[0]) for ln in lines if "\t" in ln], n, m, seed)


def _agnews(n: int, m: int, seed: int):
    lines = (DATA / "agnews-subset" / "train_subset_10001.tsv").read_text(encoding="utf-8").splitlines()
    return _text([tuple(ln.rsplit("\t", 1)) for ln in lines], n, m, seed)


def _qnli(n: int, m: int, seed: int):
    """GLUE QNLI dev pairs: question TAB sentence, entailment or not."""
    rows = [ln.split("\t") for ln in (DATA / "qnli-dev" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    return _text([(f"{r[1]}\t{r[2]}", r[3]) for r in rows if len(r) == 4], n, m, seed)


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
SETS = {"mnist": lambda n, m, s: _mnist(n, m, None, s), "mnist38": lambda n, m, s: _mnist(n, m, (3, 8), s),
        "fashion": lambda n, m, s: _mnist(n, m, None, s, FASHION), "cifar2": _cifar2, "cifar10": _cifar10,
        "sst2": _sst2, "agnews": _agnews, "qnli": _qnli}
TEXT_SETS = {"sst2", "agnews", "qnli"}


class TinyTransformer(nn.Module):
    """One pre-norm encoder block over hashed word ids (0 pads), mean-pooled, then a linear head."""

    def __init__(self, classes: int, vocab: int = 2048, width: int = 64, heads: int = 2, length: int = 48):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        keep = (ids != 0).to(torch.float32)
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).expand(b, t))
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, -1).unbind(2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        logits = logits + (keep[:, None, None, :] - 1.0) * 1e4
        h = h + self.proj(torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(b, t, -1))
        h = h + self.ff(self.norm2(h))
        return self.head((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0))


def build(arch: str, shape: tuple[int, ...], classes: int) -> nn.Module:
    """The model of ``arch`` for inputs of ``shape`` (one example)."""
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 128), nn.ReLU(), nn.Linear(128, classes))
    if arch == "cnn":  # channels-first images
        c, h, w = shape
        return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * (h // 4) * (w // 4), classes))
    return TinyTransformer(classes)


def encode(arch: str, name: str, x: np.ndarray) -> torch.Tensor:
    """The inputs of set ``name`` as ``arch`` reads them: hashed counts or token ids for text,
    flat pixels (MLP) or channels-first images (CNN)."""
    if name in TEXT_SETS:
        return torch.from_numpy(_token_ids(list(x)) if arch == "transformer" else _hashed(list(x)))
    if arch == "transformer":
        raise SystemExit(f"the transformer reads text; {name} is an image set")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) if arch == "cnn" else x.reshape(len(x), -1)))


RECIPES = {  # optimizer, lr, epochs scale: the MLP's recipe is the issue's held-out one
    "mlp": ("sgd", 0.05, 1.0), "cnn": ("sgd", 0.02, 0.5), "transformer": ("adamw", 1e-3, 0.5)}


def train(arch: str, x: torch.Tensor, y: torch.Tensor, classes: int, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    model = build(arch, tuple(x.shape[1:]), classes)
    kind, lr, scale = RECIPES[arch]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3) if kind == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(max(1, round(epochs * scale))):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


def margins(arch: str, state: dict, x: torch.Tensor, y: torch.Tensor, classes: int) -> np.ndarray:
    model = build(arch, tuple(x.shape[1:]), classes)
    model.load_state_dict(state)
    with torch.no_grad():
        return tda.ClassificationTask().output(model.eval(), {"x": x, "y": y}).numpy()


def ground_truth(name: str, arch: str, n: int, a: argparse.Namespace):
    """Train and query features of the M attributed models, subset masks and outputs (cached)."""
    from tda.core.features import ArrayFeatures, FeatureBlock

    tag = "" if arch == "mlp" else f"-{arch}"
    path = a.cache / f"{name}{tag}-n{n}-k{a.k}-M{a.models}-S{a.subsets}x{a.seeds}-e{a.epochs}-s{a.seed}.npz"
    if path.is_file():
        z = np.load(path)
        feats = ArrayFeatures(FeatureBlock(z["train_ids"], z["train_feats"], z["train_q"]), range(a.models))
        return (feats, FeatureBlock(z["query_ids"], z["query_feats"], z["query_q"]), z["masks"], z["outputs"],
                int(z["classes"]), float(z["acc"]), str(z["projection"]))
    xtr, ytr, xq, yq, classes = SETS[name](n, a.queries, a.seed)
    xt, xqt = encode(arch, name, xtr), encode(arch, name, xq)
    yt, yqt = torch.from_numpy(ytr), torch.from_numpy(yq)
    ckpts = [train(arch, xt, yt, classes, s, a.epochs) for s in range(a.models)]
    acc = float(np.mean([(margins(arch, c, xqt, yqt, classes) > 0).mean() for c in ckpts]))
    rng = np.random.default_rng(a.seed + 1)
    masks = np.zeros((a.subsets, n), bool)
    outputs = np.zeros((a.subsets, len(yq)))
    for j in tqdm(range(a.subsets), desc=f"{name}/{arch}/{n} ground truth", leave=False):
        masks[j, rng.choice(n, n // 2, replace=False)] = True
        keep = torch.from_numpy(np.flatnonzero(masks[j]))
        outputs[j] = np.mean([margins(arch, train(arch, xt[keep], yt[keep], classes, 1000 + 10 * j + r, a.epochs),
                                      xqt, yqt, classes) for r in range(a.seeds)], axis=0)
    attr = tda.Attributor(build(arch, tuple(xt.shape[1:]), classes), ckpts, k=a.k, batch_size=128).fit((xt, yt))
    query, tb = attr.featurize((xqt, yqt)), attr.train_features.block
    a.cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_ids=tb.ids, train_feats=tb.feats, train_q=tb.q, query_ids=query.ids, query_feats=query.feats,
             query_q=query.q, masks=masks, outputs=outputs, classes=classes, acc=acc, projection=attr.projection)
    return attr.train_features, query, masks, outputs, classes, acc, attr.projection


def run_set(name: str, arch: str, n: int, a: argparse.Namespace) -> dict:
    t0 = time.time()
    train_features, query, masks, outputs, classes, acc, projection = ground_truth(name, arch, n, a)
    yq = query.ids
    folds = split_folds(len(yq), a.subsets, seed=a.seed)
    tq, rq, tj, rj = (folds[k] for k in ("tune_queries", "report_queries", "tune_subsets", "report_subsets"))

    def fold_lds(lam, q, j, n_boot=1000):
        scores = score_matrix(query.select(q), TRAKScorer(lam).fit(train_features), train_features)
        return lds(scores, masks[j], outputs[np.ix_(j, q)], n_boot=n_boot)

    tuning = {lam: fold_lds(lam, tq, tj, 1).mean for lam in GRID}
    best = max(tuning, key=lambda k: -np.inf if np.isnan(tuning[k]) else tuning[k])
    auto_scorer = TRAKScorer("auto").fit(train_features)
    auto, fixed = fold_lds("auto", rq, rj), fold_lds(best, rq, rj)
    report_grid = {lam: fold_lds(lam, rq, rj, 1).mean for lam in GRID}
    return {"set": name, "arch": arch, "n": n, "classes": classes, "k": a.k, "M": a.models, "query_accuracy": acc,
            "auto": auto.mean, "auto_ci": [auto.ci_low, auto.ci_high],
            "auto_lambda_rel": [float(v) for v in auto_scorer.chosen_lambda_rel],
            "auto_df": [float(v) for v in auto_scorer.target_df],
            "best_fixed": fixed.mean, "best_lambda_rel": best, "gap": auto.mean - fixed.mean,
            "tuning": {str(k): v for k, v in tuning.items()}, "report_grid": {str(k): v for k, v in report_grid.items()},
            "projection": projection, "seconds": round(time.time() - t0, 1)}


# The rule's constants were chosen on the first eight MLP pairs (with benchmarks/ridge.py's sets);
# AG News with the MLP and every CNN / transformer pair and n >> k below were held out.
PAIRS = ["mnist:mlp:400", "mnist:mlp:1500", "mnist38:mlp:400", "mnist38:mlp:1500", "cifar2:mlp:400",
         "cifar2:mlp:1500", "sst2:mlp:400", "sst2:mlp:1500", "agnews:mlp:400", "agnews:mlp:1500",
         "sst2:transformer:400", "agnews:transformer:1500", "cifar10:cnn:400", "cifar2:cnn:1500",
         "mnist:mlp:5000", "qnli:transformer:1500", "fashion:mlp:5000", "cifar10:cnn:3000"]
HELD_OUT = set(PAIRS[8:])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="*", default=PAIRS, help="set:arch:n (arch mlp, cnn or transformer)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--seeds", type=int, default=2, help="models per subset")
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20, help="MLP epochs (CNN and transformer: half)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tda" / "ridge-regimes",
                   help="features and ground truth per set (reused)")
    return p


def main() -> int:
    a = parser().parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| set | model | n | classes | acc | auto LDS | auto lambda_rel (df) | best fixed (lambda_rel) | gap | held out |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pair in a.pairs:
        name, arch, n = pair.split(":")
        if name not in SETS or arch not in RECIPES:
            raise SystemExit(f"--pairs {pair}: the set is one of {sorted(SETS)}, the model one of {sorted(RECIPES)}")
        r = run_set(name, arch, int(n), a)
        rows.append(r)
        lam = np.exp(np.mean(np.log(r["auto_lambda_rel"])))
        print(f"| {name} | {arch} | {n} | {r['classes']} | {r['query_accuracy']:.2f} | {r['auto']:.3f} | {lam:.3g} "
              f"({np.mean(r['auto_df']):.0f}) | {r['best_fixed']:.3f} ({r['best_lambda_rel']:g}) | "
              f"{r['gap']:+.3f} | {'yes' if pair in HELD_OUT else ''} |", flush=True)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))
    gaps = [r["gap"] for r in rows]
    print(f"\nworst gap {min(gaps):+.3f}; mean {np.mean(gaps):+.3f}; {sum(g < -0.02 for g in gaps)} of {len(gaps)} "
          "below -0.02")
    return 0


if __name__ == "__main__":
    sys.exit(main())
