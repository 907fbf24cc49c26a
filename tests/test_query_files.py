"""Queries from Hugging Face data set files (parquet, arrow, csv, json, save_to_disk) and their errors;
changing the queries of a run reuses its checkpoints, train features, scorer and index."""

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from pipelines.cli.main import main
from tda.data.loading import load_mnist
from tda.errors import DataError, DuplicateIdError, ShapeError
from tda.data.query_files import image_queries, load_table, text_queries

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")


def _mnist_rows(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    ds = load_mnist(MNIST, "test", n).with_format("numpy")
    return np.asarray(ds["image"]).reshape(n, 28, 28), np.asarray(ds["label"])


def _write(ds: datasets.Dataset, path: Path) -> Path:
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    elif path.suffix == ".csv":
        ds.to_csv(str(path), index=False)
    elif path.suffix in (".json", ".jsonl"):
        ds.to_json(str(path))
    else:
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "json", "disk", "arrow"])
def test_image_queries_from_every_format_equal_the_shipped_rows(tmp_path, fmt):
    images, labels = _mnist_rows()
    ds = datasets.Dataset.from_dict({"id": np.arange(100, 106), "image": images.tolist(), "label": labels})
    if fmt == "arrow":  # a single .arrow file, as datasets writes them
        path = Path(_write(ds, tmp_path / "disk"))
        path = next(path.glob("*.arrow"))
    else:
        path = _write(ds, tmp_path / {"parquet": "q.parquet", "json": "q.jsonl", "disk": "q"}[fmt])
    out = image_queries(load_table(path, limit=4), (1, 28, 28), 10).with_format("numpy")
    np.testing.assert_array_equal(np.asarray(out["image"]), images[:4].reshape(4, -1))
    np.testing.assert_array_equal(out["label"], labels[:4])
    np.testing.assert_array_equal(out["id"], np.arange(100, 104))


def test_encoded_images_and_flat_csv(tmp_path):
    from PIL import Image

    images, labels = _mnist_rows(3)
    png = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
        png.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": png, "label": labels}).cast_column("image", datasets.Image())
    out = image_queries(load_table(_write(ds, tmp_path / "png.parquet")), (1, 28, 28), 10).with_format("numpy")
    np.testing.assert_array_equal(np.asarray(out["image"]), images.reshape(3, -1))
    np.testing.assert_array_equal(out["id"], np.arange(3))  # no id column: rows numbered
    # CSV cannot hold lists: pixels as one string column do not parse, and the error says so
    flat = datasets.Dataset.from_dict({"image": [" ".join(map(str, r)) for r in images.reshape(3, -1)], "label": labels})
    with pytest.raises((DataError, ShapeError)):
        image_queries(load_table(_write(flat, tmp_path / "q.csv")), (1, 28, 28), 10)


def test_text_queries(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["I do beseech you, my good ", "First "],
                                     "completion": ["lord.", "Citizen:"], "id": [7, 9]})
    ids, pairs = text_queries(load_table(_write(ds, tmp_path / "q.csv")))
    assert ids.tolist() == [7, 9] and pairs[0] == ("I do beseech you, my good ", "lord.")
    bad = datasets.Dataset.from_dict({"prompt": ["a"], "answer": ["b"]})
    with pytest.raises(DataError, match="completion"):
        text_queries(load_table(_write(bad, tmp_path / "bad.json")))


@pytest.mark.parametrize("case, error, match", [
    ("missing", DataError, "does not exist"),
    ("suffix", DataError, "unknown format"),
    ("columns", DataError, "lacks column"),
    ("shape", ShapeError, "expected 784 values"),
    ("label", DataError, "integers 0..9"),
    ("pixels", DataError, "0..255"),
    ("duplicate", DuplicateIdError, "duplicates"),
    ("empty", DataError, "no rows"),
])
def test_bad_query_files_name_the_problem(tmp_path, case, error, match):
    images, labels = _mnist_rows(3)
    cols = {"id": [1, 2, 3], "image": images.tolist(), "label": labels.tolist()}
    if case == "columns":
        del cols["label"]
    if case == "shape":
        cols["image"] = images[:, :20].tolist()
    if case == "label":
        cols["label"] = [1, 2, 12]
    if case == "pixels":
        cols["image"] = (images.astype(np.int64) * 4 - 3).tolist()
    if case == "duplicate":
        cols["id"] = [1, 1, 3]
    ds = datasets.Dataset.from_dict(cols)
    path = _write(ds if case != "empty" else ds.select([]), tmp_path / "q.parquet")
    if case == "missing":
        path = tmp_path / "nope.parquet"
    if case == "suffix":
        path = path.rename(tmp_path / "q.xlsx")
    with pytest.raises(error, match=match):
        image_queries(load_table(path), (1, 28, 28), 10)


def test_run_with_query_file_reuses_the_training_side(tmp_path, capsys):
    """Switching a run from the shipped queries to a file re-featurizes only the queries; the
    scores of the same images are identical."""
    config = str(ROOT / "configs" / "tiny.yaml")
    out = tmp_path / "run"
    base = ["run", config, "--out", str(out), "--set", f"data.root={MNIST}", "--quiet"]
    assert main(base) == 0
    before = np.load(out / "scores" / "scores.npy")
    kept = {p: p.stat().st_mtime_ns for p in [*out.glob("checkpoints/*"), *out.glob("features-train/**/*.npy"),
                                                *out.glob("index/*"), *out.glob("scorer/*")]}
    images, labels = _mnist_rows(20)
    ds = datasets.Dataset.from_dict({"id": np.arange(20), "image": images.tolist(), "label": labels})
    path = _write(ds.select(range(10, 20)), tmp_path / "queries.parquet")  # test images 10..19
    assert main([*base, "--set", f"data.query_path={path}"]) == 0
    after = np.load(out / "scores" / "scores.npy")
    np.testing.assert_allclose(after, before[10:20], rtol=1e-5, atol=1e-7)  # other batch shapes: not bit-equal
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing on the training side was redone
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["data"]["query_path"] == str(path)
    with np.load(out / "scores" / "topk.npz") as z:
        assert z["query_ids"].tolist() == list(range(10, 20))
