"""Mislabel detection by self-influence of the measured output against that of the training loss
(issue 25: ``tda.Attributor.self_influence(target="output" | "loss")``), per scorer, on three
data sets, with the final model's training loss as the plain baseline.

Each data set: 2,000 training rows, 10% of the labels replaced by another class (seeded); a
ReLU MLP trained with SGD (momentum 0.9, lr 0.05, batch 64, 6 epochs), checkpoints after epochs
2, 4 and 6 (TracIn-CP over them with the learning rate as weight). The score of each row is its
self-influence; ROC-AUC of flipped against kept rows (1 = every flipped row ranks above every
kept one; 0.5 = chance). Data from ../shared/data: MNIST (784 pixels / 255), CIFAR-2 (3,072
pixels / 255) and AG News (4 classes; words hashed into 2,048 counts, log1p).

    python benchmarks/self_influence.py                 # the three sets, k = 1024
    python benchmarks/self_influence.py --only mnist --n 1000
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

import tda  # noqa: E402
from tda.workflows.curation import roc_auc  # noqa: E402


def mnist(n: int) -> tuple[np.ndarray, np.ndarray, int]:
    from tda.data.loading import load_mnist

    ds = load_mnist(DATA / "mnist", "train", n)
    x = np.asarray(ds.with_format("numpy")["image"], np.float32) / 255.0
    return x.reshape(len(x), -1), np.asarray(ds["label"], np.int64), 10


def cifar2(n: int) -> tuple[np.ndarray, np.ndarray, int]:
    z = np.load(DATA / "cifar10" / "cifar2_cat_dog_from_jpeg_uint8.npz")
    return z["x_train"][:n].reshape(n, -1).astype(np.float32) / 255.0, z["y_train"][:n].astype(np.int64), 2


def agnews(n: int, width: int = 2048) -> tuple[np.ndarray, np.ndarray, int]:
    rows = [line.rsplit("\t", 1) for line in
            (DATA / "agnews-subset" / "train_subset_10001.tsv").read_text(encoding="utf-8").splitlines()[:n]]
    names = sorted({r[-1] for r in rows})
    x = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        for word in r[0].lower().split():
            x[i, zlib.crc32(word.encode()) % width] += 1.0
    return np.log1p(x), np.asarray([names.index(r[-1]) for r in rows], np.int64), len(names)


SETS = {"mnist": mnist, "cifar2": cifar2, "agnews": agnews}


def flip(y: np.ndarray, classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bad = rng.choice(len(y), int(share * len(y)), replace=False)
    noisy = y.copy()
    noisy[bad] = (y[bad] + rng.integers(1, classes, len(bad))) % classes
    mask = np.zeros(len(y), bool)
    mask[bad] = True
    return noisy, mask


def train(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int = 0, epochs: int = 6, lr: float = 0.05):
    """A ReLU MLP; its state dicts after epochs 2, 4, 6, the model and the final losses."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, classes))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    ckpts = []
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch % 2 == 0:
            ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none").numpy()
    return model, ckpts, loss, lr


def run_set(name: str, n: int, k: int, seed: int) -> dict:
    x, y, classes = SETS[name](n)
    noisy, mask = flip(y, classes, 0.1, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(noisy)
    t = time.time()
    model, ckpts, loss, lr = train(xt, yt, classes, seed)
    row = {"set": name, "n": len(y), "classes": classes, "flipped": int(mask.sum()), "loss (final model)":
           roc_auc(loss, mask)}
    for scorer, options in (("tracin", {"learning_rates": [lr] * len(ckpts)}), ("trak", {})):
        attr = tda.Attributor(model, ckpts, scorer=scorer, scorer_options=options, k=k, batch_size=128).fit((xt, yt))
        for target in ("output", "loss"):
            ids, si = attr.self_influence(target=target)
            row[f"{scorer} {target}"] = roc_auc(si, mask[ids])
    row["seconds"] = round(time.time() - t, 1)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=list(SETS), choices=list(SETS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(2)
    rows = [run_set(name, a.n, a.k, a.seed) for name in a.only]
    cols = ["loss (final model)", "tracin output", "tracin loss", "trak output", "trak loss"]
    print("| set | n | classes | " + " | ".join(cols) + " | s |")
    print("|---|---|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        print(f"| {r['set']} | {r['n']} | {r['classes']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {r['seconds']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
