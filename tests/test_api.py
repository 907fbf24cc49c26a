"""The public Attributor API end to end on a tiny model, and the data layer (idx files, MNIST)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import tda
from tda.data.loading import example_ids, iter_batches, load_mnist, mnist_collate, read_idx
from tda.errors import CheckpointError, DataError, NonFiniteError, TDAError
from tda.gradients.per_example import flatten_grads, per_example_grads
from tda.core.kernel import score_matrix
from tda.models.reference import mlp
from tda.projections.projectors import Projector
from tda.projections.sparse import SparseProjector

HIDDEN, K = (8,), 64


def _images_dataset(rng: np.random.Generator, n: int, id_offset: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "id": id_offset + 2 * np.arange(n),
        "image": rng.integers(0, 256, size=(n, 784)).astype(np.uint8).tolist(),
        "label": rng.integers(0, 10, size=n),
    })


def _state(seed: int, hidden=HIDDEN) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in mlp(784, hidden, 10).state_dict().items()}


@pytest.fixture
def api_setup(rng):
    train = _images_dataset(rng, 40, id_offset=500)
    query = _images_dataset(rng, 5, id_offset=9000)
    ckpts = [_state(0), _state(1)]
    return train, query, ckpts


def _attributor(ckpts, **kw) -> tda.Attributor:
    args = dict(collate=mnist_collate, k=K, batch_size=16)
    args.update(kw)
    return tda.Attributor(mlp(784, HIDDEN, 10), ckpts, **args)


def test_attributor_scores_and_top_k(api_setup) -> None:
    train, query, ckpts = api_setup
    attr = _attributor(ckpts).fit(train)
    train_ids = 500 + 2 * np.arange(40)
    np.testing.assert_array_equal(attr.train_features.ids, train_ids)
    assert attr.train_features.block.feats.shape == (2, 40, K)
    scores = attr.scores(query)
    assert scores.shape == (5, 40) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    direct = score_matrix(attr.featurize(query), attr.scorer, attr.train_features)
    np.testing.assert_array_equal(scores, direct)
    top = attr.top_k(query, k=3)
    assert set(top.proponent_ids.ravel()) <= set(train_ids)
    assert set(top.opponent_ids.ravel()) <= set(train_ids)
    np.testing.assert_array_equal(top.proponent_ids, train_ids[np.argsort(-scores, axis=1)[:, :3]])
    np.testing.assert_array_equal(top.opponent_ids, train_ids[np.argsort(scores, axis=1)[:, :3]])


@pytest.mark.parametrize("projection", ["sparse", "dense"])
def test_attributor_features_equal_manual_pipeline(api_setup, projection: str) -> None:
    train, _, ckpts = api_setup
    attr = _attributor(ckpts, projection=projection).fit(train)
    batch = mnist_collate(train.with_format("numpy")[:])
    model = mlp(784, HIDDEN, 10)
    names = [n for n, _ in model.named_parameters()]
    dim = sum(p.numel() for p in model.parameters())
    for c, state in enumerate(ckpts):
        model.load_state_dict(state)
        flat = flatten_grads(per_example_grads(model, tda.ClassificationTask(), batch), names)
        proj = SparseProjector(dim, K, seed=0) if projection == "sparse" else Projector(dim, K, seed=0)
        phi = proj.project(flat, c)
        np.testing.assert_allclose(attr.train_features.block.feats[c], phi.numpy(), rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            p_true = torch.softmax(model(batch["x"]), 1)[torch.arange(40), batch["y"]]
        np.testing.assert_allclose(attr.train_features.block.q[c], (1 - p_true).numpy(),
                                   rtol=1e-5, atol=1e-6)
    # batching does not change the features
    whole = _attributor(ckpts, batch_size=40, projection=projection).featurize(train)
    np.testing.assert_allclose(whole.feats, attr.train_features.block.feats, rtol=1e-5, atol=1e-7)


def test_checkpoint_paths_give_the_same_scores(api_setup, tmp_path) -> None:
    train, query, ckpts = api_setup
    paths = []
    for c, state in enumerate(ckpts):
        paths.append(tmp_path / f"ckpt{c}.pt")
        torch.save(state, paths[-1])
    from_paths = _attributor(paths).fit(train).scores(query)
    np.testing.assert_allclose(from_paths, _attributor(ckpts).fit(train).scores(query), rtol=1e-6, atol=1e-7)


def test_bad_checkpoints_raise(api_setup, tmp_path) -> None:
    train, _, ckpts = api_setup
    with pytest.raises(CheckpointError, match=r"shape mismatches \['0.weight: \(9, 784\) vs model \(8, 784\)"):
        _attributor([ckpts[0], _state(2, hidden=(9,))]).fit(train)
    missing = {k: v for k, v in ckpts[0].items() if k != "2.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['2.bias'\]"):
        _attributor([missing]).fit(train)
    with pytest.raises(CheckpointError, match="does not exist"):
        _attributor([tmp_path / "nope.pt"]).fit(train)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        _attributor([tmp_path / "junk.pt"]).fit(train)
    with pytest.raises(CheckpointError, match="at least one checkpoint"):
        _attributor([])


def test_nan_weights_raise_non_finite_error(api_setup) -> None:
    train, _, ckpts = api_setup
    bad = {k: v.clone() for k, v in ckpts[1].items()}
    bad["0.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite for 16 example"):
        _attributor([ckpts[0], bad]).fit(train)


def test_scoring_before_fit_raises(api_setup) -> None:
    _, query, ckpts = api_setup
    with pytest.raises(TDAError, match=r"call fit\(train_data\) before scoring"):
        _attributor(ckpts).scores(query)


# --------------------------------------------------------------------------------------------
# Data: idx files and MNIST.

def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def test_read_idx_handcrafted(tmp_path) -> None:
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "u8").write_bytes(_idx_bytes(images, 0x08))
    got = read_idx(tmp_path / "u8")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    with gzip.open(tmp_path / "i4.gz", "wb") as fh:
        fh.write(_idx_bytes(ints, 0x0C))
    got = read_idx(tmp_path / "i4.gz")
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, ints.astype(np.int64))


@pytest.mark.parametrize("cut", [1, 2, 12, 30])
def test_truncated_idx_raises_data_error(tmp_path, cut: int) -> None:
    ints = np.arange(6, dtype=">i4").reshape(2, 3)
    raw = _idx_bytes(ints, 0x0C)  # 12 header bytes + 24 data bytes
    (tmp_path / "cut").write_bytes(raw[: len(raw) - cut])  # mid-element, whole elements, header
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut")


def test_not_an_idx_file_raises(tmp_path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "bad")


def test_load_mnist_missing_folder_names_the_setting(tmp_path) -> None:
    with pytest.raises(DataError, match="set data.root"):
        load_mnist(tmp_path / "absent", "train")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\(.gz\) not found .* data.root"):
        load_mnist(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="split 'valid' is unknown"):
        load_mnist(tmp_path, "valid")


def test_load_mnist_from_handcrafted_files(tmp_path, rng) -> None:
    images = rng.integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(_idx_bytes(labels, 0x08))
    ds = load_mnist(tmp_path, "test", limit=5)
    assert ds.column_names == ["id", "image", "label"] and len(ds) == 5
    rows = ds.with_format("numpy")[:]
    np.testing.assert_array_equal(rows["id"], np.arange(5))
    np.testing.assert_array_equal(np.stack(rows["image"]), images[:5].reshape(5, 784))
    np.testing.assert_array_equal(rows["label"], labels[:5])
    ((ids, batch),) = list(iter_batches(ds, mnist_collate, batch_size=8))
    np.testing.assert_array_equal(ids, np.arange(5))
    expected = (images[:5].reshape(5, 784) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(batch["x"].numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="limit must be >= 1"):
        load_mnist(tmp_path, "test", limit=0)


def test_ids_and_batches_validate_input() -> None:
    dup = datasets.Dataset.from_dict({"id": [1, 1, 2], "label": [0, 1, 2]})
    with pytest.raises(DataError, match="duplicates"):
        example_ids(dup)
    no_ids = datasets.Dataset.from_dict({"label": [0, 1, 2]})
    np.testing.assert_array_equal(example_ids(no_ids), [0, 1, 2])
    with pytest.raises(DataError, match="empty"):
        next(iter_batches(no_ids.select([]), mnist_collate))
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        next(iter_batches(no_ids, mnist_collate, batch_size=0))


def test_load_mnist_real_subset(mnist_root: Path) -> None:
    ds = load_mnist(mnist_root, "test", limit=50)
    assert ds.column_names == ["id", "image", "label"] and len(ds) == 50
    rows = ds.with_format("numpy")[:]
    images = np.stack(rows["image"])
    assert images.shape == (50, 784)
    assert str(ds.features["image"].feature.dtype) == "uint8"  # stored as 784 bytes per row
    np.testing.assert_array_equal(rows["id"], np.arange(50))
    assert set(rows["label"].tolist()) <= set(range(10)) and len(set(rows["label"].tolist())) > 5
    assert 0.05 < (images > 0).mean() < 0.5  # digits: mostly background, some ink
    raw = read_idx(next(mnist_root.glob("t10k-labels-idx1-ubyte*")))
    assert raw.shape == (10000,)
    np.testing.assert_array_equal(rows["label"], raw[:50])


def test_attributor_on_real_mnist_subset(mnist_root: Path) -> None:
    train = load_mnist(mnist_root, "test", limit=30)
    query = load_mnist(mnist_root, "test", limit=34).select(range(30, 34))
    attr = _attributor([_state(0)]).fit(train)
    scores = attr.scores(query)
    assert scores.shape == (4, 30) and np.isfinite(scores).all()
    assert set(attr.top_k(query, k=5).proponent_ids.ravel()) <= set(range(30))


def test_live_state_dicts_and_the_model_are_never_written(make_mlp, tiny_data) -> None:
    """``Attributor(models[0], [m.state_dict() for m in models], ...)``: what a user writes."""
    import datasets as hf_datasets

    x, y = tiny_data(40)
    data = hf_datasets.Dataset.from_dict({"x": x.numpy(), "y": y.numpy()})

    def collate(rows):
        return {"x": torch.as_tensor(np.asarray(rows["x"], np.float32)), "y": torch.as_tensor(np.asarray(rows["y"]))}

    models = [make_mlp(seed=s) for s in range(3)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    live = tda.Attributor(models[0], [m.state_dict() for m in models], collate=collate, k=16)
    first = live.featurize(data).feats
    assert all(torch.equal(v, before[i][k]) for i, m in enumerate(models) for k, v in m.state_dict().items())
    np.testing.assert_allclose(live.featurize(data).feats, first, rtol=1e-5, atol=1e-6)  # the same twice
    snap = tda.Attributor(make_mlp(seed=0), before, collate=collate, k=16)
    np.testing.assert_allclose(snap.featurize(data).feats, first, rtol=1e-5, atol=1e-6)
