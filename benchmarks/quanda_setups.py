"""Data, models and the altered training sets of ``benchmarks/quanda.py`` (Quanda's offline metrics).

Each setup is a training set the models are trained on, the queries to explain, the class each
query's explanation is for, and what the metric needs (shortcut / adversarial / mislabelled rows,
subclass labels). Everything is seeded; images are float tensors in [0, 1], (n, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Source:
    """A data set's training pool, test pool, classes, a foreign image set and its model builder."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    foreign: torch.Tensor  # images of another data set, in this one's shape (mixed data sets)
    build: Callable[[], nn.Module]
    lr: float
    epochs: int


@dataclass
class Setup:
    """Models are trained on (x, y); explanations are of queries ``qx`` for classes ``qt``."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    qx: torch.Tensor
    qt: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def mnist_source(n: int, n_test: int) -> Source:
    from tda.data.loading import load_mnist

    def images(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = load_mnist(DATA / "mnist", split, limit).with_format("numpy")
        x = torch.from_numpy(np.asarray(ds["image"], np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return x, torch.from_numpy(np.asarray(ds["label"], np.int64))

    x, y = images("train", n)
    xt, yt = images("test", n_test)
    cifar = _cifar10_images()
    gray = cifar.mean(dim=1, keepdim=True)  # CIFAR crops as 28 x 28 grey digits-to-be
    foreign = F.interpolate(gray, size=(28, 28), mode="bilinear", align_corners=False)
    return Source("MNIST", x, y, xt, yt, 10, foreign, lambda: mlp(784, 10), lr=0.05, epochs=8)


def cifar2_source(n: int, n_test: int) -> Source:
    z = np.load(DATA / "cifar10" / "cifar2_cat_dog_from_jpeg_uint8.npz")

    def images(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.random.default_rng(0).permutation(len(z[f"y_{split}"]))[:limit]  # the file is sorted by class
        x = torch.from_numpy(z[f"x_{split}"][rows].astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(z[f"y_{split}"][rows].astype(np.int64))

    (x, y), (xt, yt) = images("train", n), images("test", n_test)
    digits = mnist_source(400, 1).x  # MNIST digits as 32 x 32 colour images
    foreign = F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return Source("CIFAR-2", x, y, xt, yt, 2, foreign, small_cnn, lr=0.02, epochs=12)


def _cifar10_images(limit: int = 400) -> torch.Tensor:
    z = np.load(DATA / "cifar10" / "cifar10_train_first4000_lossless_convnetjs.npz")
    return torch.from_numpy(z["x"][:limit].astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def mlp(inputs: int, classes: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 2))


def train(src: Source, x: torch.Tensor, y: torch.Tensor, seed: int, classes: int | None = None) -> dict:
    """Momentum SGD (0.9), batch 64, weight decay 5e-4: the trained model's state dict."""
    torch.manual_seed(seed)
    model = src.build() if classes is None or classes == src.classes else _rehead(src, classes)
    opt = torch.optim.SGD(model.parameters(), lr=src.lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(src.epochs):
        for rows in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rehead(src: Source, classes: int) -> nn.Module:
    model = src.build()
    last = model[-1]
    model[-1] = nn.Linear(last.in_features, classes)
    return model


def model_for(src: Source, state: dict) -> nn.Module:
    classes = int(state[[k for k in state if k.endswith("bias")][-1]].shape[0])
    model = src.build() if classes == src.classes else _rehead(src, classes)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def predict(src: Source, state: dict, x: torch.Tensor) -> torch.Tensor:
    return model_for(src, state)(x).argmax(dim=1)


def add_patch(x: torch.Tensor, size: int = 4) -> torch.Tensor:
    out = x.clone()
    out[:, :, 1:1 + size, 1:1 + size] = 1.0  # a white square near the top-left corner
    return out


def clean(src: Source, queries: int) -> Setup:
    return Setup("clean", src.x, src.y, src.x_test[:queries], src.y_test[:queries])


def subclass(src: Source, queries: int, groups: int = 2, seed: int = 0) -> Setup:
    """Classes grouped at random into ``groups`` superclasses; models learn the superclasses."""
    perm = torch.randperm(src.classes, generator=torch.Generator().manual_seed(seed))
    group_of = torch.empty(src.classes, dtype=torch.int64)
    group_of[perm] = torch.arange(src.classes) % groups
    return Setup("subclass", src.x, group_of[src.y], src.x_test[:queries], group_of[src.y_test[:queries]],
                 {"classes": groups, "subclass_labels": src.y, "query_subclasses": src.y_test[:queries]})


def mislabel(src: Source, share: float = 0.1, seed: int = 0) -> Setup:
    from tda.workflows.curation import flip_labels

    noisy, flipped = flip_labels(src.y.numpy(), share, seed, src.classes)
    return Setup("mislabel", src.x, torch.from_numpy(np.asarray(noisy, np.int64)), src.x_test[:1], src.y_test[:1],
                 {"mislabelled": np.flatnonzero(flipped).tolist()})


def shortcut(src: Source, queries: int, cls: int = 0, share: float = 0.75, seed: int = 0) -> Setup:
    """A white patch on ``share`` of class ``cls``'s training rows; queries: patched test rows of
    other classes (those the model then assigns to ``cls`` are kept by :func:`keep_predicted`)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.nonzero(src.y == cls).flatten()
    marked = rows[torch.randperm(len(rows), generator=g)[: int(share * len(rows))]]
    x = src.x.clone()
    x[marked] = add_patch(x[marked])
    other = torch.nonzero(src.y_test != cls).flatten()[:queries]
    return Setup("shortcut", x, src.y, add_patch(src.x_test[other]), torch.full((len(other),), cls),
                 {"shortcut_indices": sorted(marked.tolist()), "shortcut_cls": cls})


def mixed(src: Source, queries: int, adversarial: int, label: int = 0) -> Setup:
    """``adversarial`` images of another data set appended to the training set, all labelled
    ``label``; queries: other such images, explained for ``label``."""
    foreign = src.foreign
    x = torch.cat([src.x, foreign[:adversarial]])
    y = torch.cat([src.y, torch.full((adversarial,), label)])
    flags = torch.cat([torch.zeros(len(src.x), dtype=torch.int64), torch.ones(adversarial, dtype=torch.int64)])
    qx = foreign[adversarial: adversarial + queries]
    return Setup("mixed", x, y, qx, torch.full((len(qx),), label), {"adversarial_flags": flags, "label": label})


def keep_predicted(src: Source, setup: Setup, state: dict) -> Setup:
    """The queries the model assigns to their explanation class (Quanda's prediction filters)."""
    keep = predict(src, state, setup.qx) == setup.qt
    return Setup(setup.name, setup.x, setup.y, setup.qx[keep], setup.qt[keep], setup.extra)


__all__ = ["Setup", "Source", "add_patch", "cifar2_source", "clean", "keep_predicted", "mislabel", "mixed",
           "mnist_source", "model_for", "predict", "shortcut", "small_cnn", "subclass", "train"]
