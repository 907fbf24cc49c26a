"""Bad-input catalogue, data and weights: every data format a run reads (idx, gzip, npz, parquet,
arrow, csv, json/jsonl, save_to_disk folders), empty, truncated or garbage, with missing columns
or columns of the wrong type or shape; checkpoint files; training that diverges. The table
machinery is in ``test_bad_input_catalogue.py``."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli.main import main
from tda import errors as E
from tda.data.loading import DEMO_DATA
from tda.models.reference import mlp
from test_bad_input_catalogue import Case, check_case, make_ctx, new_run, os_refuses, write

PIXELS = [[0] * 784, [255] * 784, [7] * 784]


# ------------------------------------------------------------------------- MNIST idx files and gzip
def _mnist(damage: Callable[[Path], Any]) -> Callable[[SimpleNamespace], list[str]]:
    """A copy of the shipped MNIST idx folder, damaged, as ``data.root``."""
    def setup(ctx) -> list[str]:
        root = ctx.tmp / "mnist"
        shutil.copytree(DEMO_DATA / "mnist", root)
        ctx.root = root
        damage(root)
        return new_run(ctx, f"data.root={root}")

    return setup


def _raw(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace ``name``.gz by the plain idx file, edited."""
    def damage(root: Path) -> None:
        gz = root / f"{name}.gz"
        (root / name).write_bytes(edit(gzip.decompress(gz.read_bytes())))
        gz.unlink()

    return damage


def _gz(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda root: (root / f"{name}.gz").write_bytes(edit((root / f"{name}.gz").read_bytes()))


def _swap(target: str, source: str) -> Callable[[Path], None]:
    return lambda root: shutil.copy(root / f"{source}.gz", root / f"{target}.gz")


def _label_12(raw: bytes) -> bytes:
    return raw[:8] + bytes([12]) + raw[9:]  # the first training label is 12 of 10 classes


IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
IDX_CASES = [
    Case("idx-empty", _mnist(_raw(IMAGES, lambda b: b"")), E.DataError, (IMAGES, "empty", "copy it again")),
    Case("idx-garbage", _mnist(_raw(IMAGES, lambda b: b"\x13\x37garbage" * 50)), E.DataError,
         (IMAGES, "not an idx file", "copy it again")),
    Case("idx-truncated", _mnist(_raw(IMAGES, lambda b: b[:5000])), E.DataError, (IMAGES, "truncated", "copy it")),
    Case("idx-wrong-dimensions", _mnist(_swap(IMAGES, LABELS)), E.DataError,
         (IMAGES, "1 dimension(s)", "not images", "copy it again")),
    Case("idx-count-mismatch", _mnist(_swap(LABELS, "t10k-labels-idx1-ubyte")), E.DataError,
         ("10000 images but 2000 labels", "set data.root")),
    Case("idx-missing-file", _mnist(lambda root: (root / f"{LABELS}.gz").unlink()), E.DataError,
         (LABELS, "not found", "set data.root")),
    Case("idx-label-out-of-range", _mnist(_raw(LABELS, _label_12)), E.DataError,
         ("[12]", "outside the model's 10 classes", "fix the labels"), writes=True),
    Case("gz-empty", _mnist(_gz(IMAGES, lambda b: b"")), E.DataError, (f"{IMAGES}.gz", "empty", "copy it again")),
    Case("gz-truncated", _mnist(_gz(IMAGES, lambda b: b[:3000])), E.DataError,
         (f"{IMAGES}.gz", "truncated or corrupt", "copy it again")),
    Case("gz-garbage", _mnist(_gz(IMAGES, lambda b: b"plain text, not gzip" * 20)), E.DataError,
         (f"{IMAGES}.gz", "Not a gzipped file", "copy it again")),
    Case("idx-unreadable", lambda ctx: _mnist(lambda r: os_refuses(ctx, r / f"{IMAGES}.gz", errno.EACCES, "read"))(ctx),
         E.DataError, ("permission denied reading", f"{IMAGES}.gz", "make it readable")),
    Case("root-is-a-file", lambda ctx: new_run(ctx, f"data.root={write(ctx, 'mnist.tar', 'x')}"), E.DataError,
         ("mnist.tar", "does not exist", "set data.root")),
]


# ------------------------------------------------------------------------- CIFAR-2 npz
def _cifar(make: Callable[[Path], Any]) -> Callable[[SimpleNamespace], list[str]]:
    def setup(ctx) -> list[str]:
        root = ctx.tmp / "cifar"
        root.mkdir()
        make(root / "cifar2_cat_dog_from_jpeg_uint8.npz")
        return new_run(ctx, "data.name=cifar2", f"data.root={root}")

    return setup


def _arrays(shape: tuple[int, ...] = (32, 32, 3), keys: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")):
    rng = np.random.default_rng(0)
    data = {"x_train": rng.integers(0, 255, (40, *shape), np.uint8), "y_train": np.arange(40) % 2,
            "x_test": rng.integers(0, 255, (10, *shape), np.uint8), "y_test": np.arange(10) % 2}
    return lambda path: np.savez(path, **{k: data[k] for k in keys})


NPZ = "cifar2_cat_dog_from_jpeg_uint8.npz"
NPZ_CASES = [
    Case("npz-missing", _cifar(lambda p: None), E.DataError, (NPZ, "not found", "set data.root")),
    Case("npz-empty", _cifar(lambda p: p.write_bytes(b"")), E.DataError, (NPZ, "cannot be read", "copy it again")),
    Case("npz-garbage", _cifar(lambda p: p.write_bytes(b"PK\x03\x04 broken zip" * 10)), E.DataError,
         (NPZ, "cannot be read", "copy it again")),
    Case("npz-truncated", _cifar(lambda p: _arrays()(p) or p.write_bytes(p.read_bytes()[:4000])), E.DataError,
         (NPZ, "cannot be read", "copy it again")),
    Case("npz-missing-array", _cifar(_arrays(keys=("x_train", "y_train"))), E.DataError,
         (NPZ, "x_test", "y_test")),
    Case("npz-wrong-image-shape", _cifar(_arrays(shape=(28, 28))), E.ShapeError,
         (NPZ, "has shape (10, 28, 28)", "(n, 32, 32, 3)")),
]


# ------------------------------------------------------------------------- query files
def _save(path: Path, table: pa.Table) -> None:
    fmt = path.suffix if path.suffix else "folder"
    if fmt == ".parquet":
        pq.write_table(table, path)
    elif fmt == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif fmt == ".csv":
        pcsv.write_csv(table, path)
    elif fmt in (".json", ".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    else:
        datasets.Dataset(table).save_to_disk(str(path))


def _file(name: str, content: bytes | dict | None = None, refused: bool = False, **columns):
    """``data.query_path`` of a file ``name``: raw bytes, or the table of ``columns`` (default:
    three good images and labels, overridden per column; a ``None`` column is left out)."""
    def setup(ctx) -> list[str]:
        path = ctx.tmp / name
        if isinstance(content, bytes):
            write(ctx, name, content)
        elif content is None:
            cols = {"image": PIXELS, "label": [1, 2, 3], **columns}
            _save(path, pa.table({k: v for k, v in cols.items() if v is not None}))
        if refused:
            os_refuses(ctx, path, errno.EACCES, "read")
        return new_run(ctx, f"data.query_path={path}")

    return setup


def _splits(ctx) -> list[str]:
    path = ctx.tmp / "dd"
    good = datasets.Dataset.from_dict({"image": PIXELS, "label": [1, 2, 3]})
    datasets.DatasetDict({"train": good, "test": good}).save_to_disk(str(path))
    return new_run(ctx, f"data.query_path={path}")


NAN_PIXELS = [[float("nan")] * 784, [1.0] * 784, [2.0] * 784]
QUERY = "data.query_path"
QUERY_CASES = [
    Case("parquet-empty-file", _file("q.parquet", b""), E.DataError, (QUERY, "q.parquet", "empty file", "write it")),
    Case("parquet-garbage", _file("q.parquet", b"PAR1 not really parquet"), E.DataError, (QUERY, "check the file")),
    Case("parquet-no-rows", _file("q.parquet", image=[], label=[]), E.DataError, (QUERY, "no rows", "at least one")),
    Case("parquet-missing-label", _file("q.parquet", label=None), E.DataError, (QUERY, "['label']", "'label' columns")),
    Case("parquet-missing-image", _file("q.parquet", image=None), E.DataError, (QUERY, "['image']", "'image'")),
    Case("parquet-float-labels", _file("q.parquet", label=[0.5, 1.0, 2.0]), E.DataError,
         (QUERY, "integer class ids 0..9", "map names to ids")),
    Case("parquet-labels-beyond-classes", _file("q.parquet", label=[1, 2, 12]), E.DataError,
         (QUERY, "integers 0..9", "12")),
    Case("parquet-negative-labels", _file("q.parquet", label=[-1, 0, 1]), E.DataError, (QUERY, "integers 0..9", "-1")),
    Case("parquet-images-wrong-shape", _file("q.parquet", image=[[0] * 100] * 3), E.ShapeError,
         (QUERY, "row 0 has shape (100,)", "expected 784 values")),
    Case("parquet-images-strings", _file("q.parquet", image=["cat", "dog", "cow"]), E.ShapeError,
         (QUERY, "row 0", "expected 784 values")),
    Case("parquet-pixels-beyond-255", _file("q.parquet", image=[[300] * 784] * 3), E.DataError,
         (QUERY, "0..255", "8-bit pixels")),
    Case("parquet-nan-pixels", _file("q.parquet", image=NAN_PIXELS), E.DataError, (QUERY, "NaN", "row(s) [0]",
                                                                                   "fix or drop")),
    Case("parquet-duplicate-ids", _file("q.parquet", id=[4, 4, 5]), E.DuplicateIdError, ("'id'", "unique")),
    Case("parquet-float-ids", _file("q.parquet", id=[0.5, 1.5, 2.5]), E.DTypeError, ("'id'", "integers", "cast")),
    Case("parquet-unreadable", _file("q.parquet", refused=True), E.DataError,
         ("permission denied reading", QUERY, "make it readable")),
    Case("arrow-empty-file", _file("q.arrow", b"\0" * 8), E.DataError, (QUERY, "q.arrow", "check the file")),
    Case("arrow-garbage", _file("q.arrow", b"\xff\xff\xff\xff garbage"), E.DataError, (QUERY, "q.arrow")),
    Case("arrow-missing-label", _file("q.arrow", label=None), E.DataError, (QUERY, "['label']")),
    Case("csv-empty-file", _file("q.csv", b""), E.DataError, (QUERY, "q.csv", "empty file")),
    Case("csv-header-only", _file("q.csv", b"image,label\n"), E.DataError, (QUERY, "no rows")),
    Case("csv-missing-image", _file("q.csv", image=None), E.DataError, (QUERY, "['image']")),
    Case("csv-image-a-number", _file("q.csv", b"image,label\n0,1\n"), E.ShapeError, (QUERY, "expected 784 values")),
    Case("json-garbage", _file("q.json", b"{not json at all"), E.DataError, (QUERY, "q.json", "check the file")),
    Case("jsonl-blank-lines", _file("q.jsonl", b"\n\n"), E.DataError, (QUERY, "q.jsonl")),
    Case("jsonl-string-labels", _file("q.jsonl", label=["one", "two", "three"]), E.DataError,
         (QUERY, "integer class ids", "map names to ids")),
    Case("jsonl-null-labels", _file("q.jsonl", label=[None, 1, 2]), E.DataError, (QUERY, "fill missing labels")),
    Case("folder-empty", lambda ctx: new_run(ctx, f"{QUERY}={ctx.tmp}"), E.DataError,
         (QUERY, "neither a `Dataset` directory", "check the file")),
    Case("folder-of-splits", _splits, E.DataError, ("several splits", "['train', 'test']", "one split's folder")),
    Case("folder-missing-label", _file("qdir", label=None), E.DataError, (QUERY, "['label']")),
    Case("unknown-format", _file("q.txt", b"1,2,3"), E.DataError, (QUERY, "unknown format '.txt'", ".parquet")),
    Case("query-path-missing", lambda ctx: new_run(ctx, f"{QUERY}={ctx.tmp / 'gone.parquet'}"), E.DataError,
         (QUERY, "gone.parquet does not exist")),
]


# ------------------------------------------------------------------------- checkpoints and divergence
def _ckpt(make: Callable[[Path], object], name: str = "c.pt", refused: bool = False):
    """A run naming one checkpoint file ``make`` writes (``refused``: the OS refuses to read it)."""
    def setup(ctx) -> list[str]:
        path = ctx.tmp / name
        make(path)
        if refused:
            os_refuses(ctx, path, errno.EACCES, "read")
        return new_run(ctx, f"model.checkpoints={path}", "train.models=1")

    return setup


def _state(hidden: int = 16, poison: float | None = None) -> dict:
    torch.manual_seed(0)
    state = mlp(784, (hidden,), 10).state_dict()
    if poison is not None:
        state["0.weight"][0, 0] = poison
    return state


CHECKPOINT_CASES = [
    Case("ckpt-missing", lambda ctx: new_run(ctx, f"model.checkpoints={ctx.tmp / 'gone.pt'}"), E.CheckpointError,
         ("gone.pt does not exist", "check the path")),
    Case("ckpt-glob-matches-nothing", lambda ctx: new_run(ctx, f"model.checkpoints={ctx.tmp / 'ck-*.pt'}"),
         E.ConfigError, ("model.checkpoints: no file matches", "ck-*.pt", "check the pattern")),
    Case("ckpt-garbage", _ckpt(lambda p: p.write_bytes(b"not a checkpoint" * 9)), E.CheckpointError,
         ("c.pt cannot be read", "not a torch.save file of tensors", "torch.save(model.state_dict(), path)")),
    Case("ckpt-unreadable", _ckpt(lambda p: torch.save(_state(), p), refused=True),
         E.CheckpointError, ("permission denied reading", "c.pt", "make it readable")),
    Case("ckpt-empty-file", _ckpt(lambda p: p.write_bytes(b"")), E.CheckpointError,
         ("c.pt cannot be read", "torch.save(model.state_dict(), path)")),
    Case("ckpt-safetensors-garbage", _ckpt(lambda p: p.write_bytes(b"\x08" + b"\x00" * 20), "c.safetensors"),
         E.CheckpointError, ("c.safetensors cannot be read", "safetensors")),
    Case("ckpt-not-a-state-dict", _ckpt(lambda p: torch.save([1, 2, 3], p)), E.CheckpointError,
         ("holds a list, not a state dict", "torch.save(model.state_dict(), path)")),
    Case("ckpt-whole-model-pickled", _ckpt(lambda p: torch.save(mlp(784, (16,), 10), p)), E.CheckpointError,
         ("weights-only state dict", "object, not only tensors", "torch.save(model.state_dict(), path)")),
    Case("ckpt-other-architecture", _ckpt(lambda p: torch.save(_state(hidden=32), p)), E.CheckpointError,
         ("c.pt", "0.weight", "architecture")),
    Case("ckpt-folder-without-weights", _ckpt(lambda p: p.mkdir(), "ckdir"), E.CheckpointError,
         ("ckdir", "safetensors")),
    Case("ckpt-nan-weights", _ckpt(lambda p: torch.save(_state(poison=float("nan")), p)), E.NonFiniteError,
         ("NaN or infinite weights", "0.weight", "retrain it")),
    Case("diverged-training", lambda ctx: new_run(ctx, "train.lr=1e6", "train.models=1"), E.NonFiniteError,
         ("training diverged", "train.lr is 1e+06", "lower train.lr"), writes=True),
]


# ------------------------------------------------------------------------- your own training set (user family)
MODEL = "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))\n"


def _train(**columns) -> Callable[[SimpleNamespace], list[str]]:
    """A user-family run (model.factory, a checkpoint, data.train_path) on a training set of
    twelve rows, overridden per column."""
    def setup(ctx) -> list[str]:
        write(ctx, "catalogue_model.py", MODEL)  # a name of its own: modules stay imported
        torch.manual_seed(0)
        torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).state_dict(), ctx.tmp / "c.pt")
        cols = {"image": [[i * 20] * 784 for i in range(12)], "label": [i % 3 for i in range(12)], **columns}
        _save(ctx.tmp / "train.parquet", pa.table({k: v for k, v in cols.items() if v is not None}))
        _save(ctx.tmp / "query.parquet", pa.table({"image": PIXELS, "label": [1, 2, 3]}))
        config = write(ctx, "user.yaml", "model: {factory: 'catalogue_model:build', checkpoints: c.pt}\n"
                       "data: {train_path: train.parquet, query_path: query.parquet}\nscore: {topk: 3}\n")
        return new_run(ctx, config=str(config))

    return setup


TRAIN = "data.train_path"
TRAIN_CASES = [  # the train stage registers the checkpoint first, so the run folder has its files
    Case("train-missing-image", _train(image=None), E.DataError, ("'image'", "set data.image_column"), writes=True),
    Case("train-missing-label", _train(label=None), E.DataError, (TRAIN, "lacks the label column 'label'",
                                                                 "set data.label_column")),
    Case("train-single-class", _train(label=[4] * 12), E.DataError, (TRAIN, "single class", "check the file")),
    Case("train-labels-beyond-classes", _train(label=list(range(12))), E.DataError,
         ("index 10 is out of bounds", "a label >= the number of classes"), writes=True),
    Case("train-string-labels", _train(label=["cat", "dog", "cow"] * 4), E.DataError,
         (TRAIN, "integer class id in every row", "map names to ids")),
    Case("train-float-labels", _train(label=[0.5, 1.5, 2.5] * 4), E.DataError, (TRAIN, "integer class id", "double")),
    Case("train-images-wrong-shape", _train(image=[[0] * 100] * 12), E.ShapeError, ("shape the model expects",),
         writes=True),
    Case("train-nan-images", _train(image=[[float("nan")] * 784] * 12), E.NonFiniteError,
         ("NaN or infinite", "check the inputs"), writes=True),
]
CASES = IDX_CASES + NPZ_CASES + QUERY_CASES + TRAIN_CASES + CHECKPOINT_CASES
assert len({c.id for c in CASES}) == len(CASES), "case ids must be distinct"


@pytest.fixture
def ctx(tmp_path, monkeypatch) -> SimpleNamespace:
    return make_ctx(tmp_path, monkeypatch, None)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_data_and_weights(case, ctx, capsys):
    check_case(case, ctx, capsys)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("gz-garbage", "parquet-missing-label")],
                         ids=lambda c: c.id)
def test_the_tda_command_exits_2_without_a_traceback(case, ctx):
    """The same cases through the installed entry point, in a process of their own."""
    argv = case.setup(ctx)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli.main", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"tda: error: {case.error.__name__}: " in proc.stderr
    assert all(w in proc.stderr for w in case.words), proc.stderr


def test_a_run_refused_before_any_work_reruns_once_fixed(ctx, capsys):
    """A refused checkpoint leaves only the claim of the folder, which does not block the fixed rerun
    (before: 'holds outputs of a different configuration; pass --overwrite')."""
    check_case(CHECKPOINT_CASES[0], ctx, capsys)  # ckpt-missing
    torch.manual_seed(0)
    torch.save(mlp(784, (16,), 10).state_dict(), ctx.tmp / "found.pt")
    assert main(new_run(ctx, f"model.checkpoints={ctx.tmp / 'found.pt'}", "model.check_trained=false")) == 0  # random
