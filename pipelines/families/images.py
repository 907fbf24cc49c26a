"""Image data sets of the demo families: MNIST, Fashion-MNIST (idx files) and CIFAR-2 (npz).

``data.root`` names the folder of a data set's files; unset, MNIST comes from the compact copy
shipped with tda (``tda/data/demo_data/mnist``: the first 10,000 training and 2,000 test
images of MNIST), and the other sets from their usual places (``../shared/data`` beside the
repository, Debian's ``dataset-fashion-mnist`` package). ``data.train_size`` /
``data.query_size`` draw seeded random subsets stratified by label (:func:`tda.data.loading.draw_subset`;
``data.subset: first`` keeps the first N rows instead); ids are the rows' positions in the full
split, so provenance keys stay meaningful.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tda.data.loading import DEMO_DATA, MNIST_MEAN, MNIST_STD, draw_subset, example_ids, load_mnist
from tda.errors import ConfigError, DataError, ShapeError, reading

if TYPE_CHECKING:
    from pipelines.spec.schema import RunConfig

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # beside a checkout of the repository
CIFAR2_FILE = "cifar2_cat_dog_from_jpeg_uint8.npz"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGE_DATA = {  # name: (image shape, classes, normalisation)
    "mnist": ((1, 28, 28), 10, ((MNIST_MEAN,), (MNIST_STD,))),
    "fashion-mnist": ((1, 28, 28), 10, ((0.2860,), (0.3530,))),
    "cifar2": ((3, 32, 32), 2, (CIFAR_MEAN, CIFAR_STD)),
}
logger = logging.getLogger(__name__)
DEFAULT_ROOTS = {"mnist": DEMO_DATA / "mnist", "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
                 "cifar2": SHARED / "cifar10"}


def data_root(cfg: RunConfig) -> str:
    """``data.root``, else the data set's default folder."""
    return cfg.data.root or str(DEFAULT_ROOTS[cfg.data.name])


@functools.lru_cache(maxsize=8)
def _full_split(root: str, split: str, name: str):
    if name == "cifar2":
        return load_cifar2(root, split, None)
    if name == "fashion-mnist" and not Path(root).is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist; install Debian's dataset-fashion-mnist "
                        "package (it fills /usr/share/datasets/fashion-mnist) or set data.root to its idx files")
    return load_mnist(root, split)


@functools.lru_cache(maxsize=8)
def _subset(root: str, split: str, name: str, size: int | None, seed: int, how: str):
    full = _full_split(root, split, name)
    if size is not None and size > len(full):
        logger.warning("%s %s has %d images, fewer than the %d asked for (data.train_size / query_size); using all "
                       "of them", name, split, len(full), size)
    return draw_subset(full, size, seed, "label", how)


def image_split(cfg: RunConfig, split: str, size: int | None):
    """``size`` rows of a split of the configured image data set (seeded, stratified, cached)."""
    d = cfg.data
    seed = d.seed if split == "train" else d.seed + 1  # train and query subsets drawn apart
    return _subset(data_root(cfg), split, d.name, size, seed, d.subset)


def image_datasets(cfg: RunConfig) -> dict[str, Any]:
    """Train and query sets: ``data.query_path`` when set, else the query split's subset; the
    training labels flipped at ``data.label_noise``."""
    d = cfg.data
    query = image_query_file(cfg) if d.query_path else image_split(cfg, d.query_split, d.query_size)
    train = with_label_noise(image_split(cfg, "train", d.train_size), cfg, IMAGE_DATA[d.name][1])
    return {"train": train, "query": query}


def with_label_noise(table: Any, cfg: RunConfig, n_classes: int | None = None, column: str = "label") -> Any:
    """``table`` with a seeded ``data.label_noise`` share of its ``column`` moved to another class
    (:func:`tda.workflows.curation.flip_labels`; ``n_classes`` None: the largest label + 1)."""
    fraction = cfg.data.label_noise
    if not fraction:
        return table
    if column not in table.column_names:
        raise ConfigError(f"data.label_noise needs class labels, and the training set has no {column!r} column "
                          f"(it has {table.column_names}); set data.label_column or drop data.label_noise")
    from tda.workflows.curation import flip_labels

    labels = np.asarray(table[column])
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"data.label_noise needs integer class labels in {column!r}, found {labels.dtype}")
    noisy, _ = flip_labels(labels, fraction, cfg.data.seed, n_classes or int(labels.max()) + 1)
    return table.remove_columns(column).add_column(column, noisy)


def load_cifar2(root: str, split: str, limit: int | None):
    """CIFAR-2 (cat 0, dog 1) as a Dataset: ``id``, ``image`` (3072 uint8, channel-major), ``label``."""
    import datasets
    import pyarrow as pa

    path = Path(root) / CIFAR2_FILE
    if not path.is_file():
        raise DataError(f"CIFAR-2 file {path} not found; set data.root to the folder holding {CIFAR2_FILE} "
                        "(../shared/data/cifar10 in this project)")
    with reading(path, "", "the file is truncated or corrupt: copy it again"):
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (f"x_{split}", f"y_{split}") if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {missing} (it has {z.files}); CIFAR-2 needs x_train, "
                                "y_train, x_test, y_test: copy the file again")
            x, y = z[f"x_{split}"][:limit], z[f"y_{split}"][:limit]  # (n, 32, 32, 3) uint8, (n,)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != x.shape[:1]:
        raise ShapeError(f"{path}: x_{split} has shape {x.shape} and y_{split} {y.shape}; CIFAR-2 needs images "
                         "(n, 32, 32, 3) uint8 and labels (n,): copy the file again")
    flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(-1)  # channel-major rows
    return datasets.Dataset(pa.table({
        "id": pa.array(np.arange(len(x), dtype=np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(flat), 3 * 32 * 32),
        "label": pa.array(np.asarray(y, dtype=np.int64)),
    }))


class ImageCollate:
    """Rows -> ``{"x": (B, C*H*W) float32 normalised per channel, "y": (B,) int64}`` (picklable)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        x = np.asarray(rows["image"], dtype=np.float32).reshape(len(rows["image"]), len(self.mean), -1) / 255.0
        x = (x - self.mean[None, :, None]) / self.std[None, :, None]
        return {"x": torch.from_numpy(x.reshape(x.shape[0], -1)),
                "y": torch.from_numpy(np.array(rows["label"], dtype=np.int64))}


def image_query_file(cfg: RunConfig):
    """Image queries from ``data.query_path`` (parquet/arrow/csv/json, see :mod:`tda.data.query_files`),
    checked against the data set's image shape and classes; cached per process."""
    return _image_query_file(cfg.data.query_path, cfg.data.query_size, cfg.data.name)


@functools.lru_cache(maxsize=4)
def _image_query_file(path: str, limit: int, name: str):
    from tda.data.query_files import image_queries, load_table

    shape, classes, _ = IMAGE_DATA[name]
    return image_queries(load_table(path, limit), shape, classes)


def unused_train_rows(cfg: RunConfig, count: int, what: str = "AirRep"):
    """``count`` training-split rows the run never trains on (outside the ``data.train_size``
    subset, in order): AirRep's training queries. Disjointness is checked again on provenance."""
    d = cfg.data
    full = _full_split(data_root(cfg), "train", d.name)
    if d.train_size is None or d.train_size >= len(full):
        raise DataError(f"{what} takes its training queries from training images outside the training set; set "
                        f"data.train_size below the split's {len(full)} rows")
    used = set(example_ids(image_split(cfg, "train", d.train_size)).tolist())
    free = [r for r, i in enumerate(example_ids(full).tolist()) if i not in used][:count]
    if len(free) < count:
        raise DataError(f"{what} needs {count} training queries outside the {d.train_size} training examples, but "
                        f"only {len(free)} rows are left; lower data.train_size or score.options.queries")
    return full.select(free)
