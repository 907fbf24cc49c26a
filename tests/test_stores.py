"""Feature store: round trip, manifest contents, resumption, corruption and foreign folders."""

import json

import numpy as np
import pytest

from stores import FeatureStore, StoreLock, shard_path, write_shard_files
from tda.errors import (FingerprintMismatchError, ForeignStoreError, ShapeError, StoreCorruptError,
                        StoreError, StoreLockedError)


def _fill(store, feats, q, ids):
    for c in store.checkpoints:
        for s in range(store.n_shards):
            lo, hi = store.shard_rows(s)
            store.write_shard(c, s, ids[lo:hi], feats[c, lo:hi], q[c, lo:hi])


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 250, 16)).astype(np.float32), rng.random((2, 250)).astype(np.float32),
            np.arange(250, dtype=np.int64) * 3 + 7)


def make(tmp_path, **kw):
    args = dict(n=250, k=16, checkpoints=[0, 1], shard_size=100, fingerprint="fp1", spec={"k": 16, "seed": 0})
    args.update(kw)
    return FeatureStore.create(tmp_path / "store", **args)


def test_round_trip_and_manifest(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path)
    assert store.n_shards == 3 and store.pending() == [(c, s) for c in (0, 1) for s in range(3)]
    _fill(store, feats, q, ids)
    reopened = FeatureStore.open(tmp_path / "store")
    assert reopened.is_complete()
    blocks = list(reopened.iter_blocks(64))
    assert [len(b) for b in blocks] == [64, 36, 64, 36, 50]
    np.testing.assert_array_equal(np.concatenate([b.ids for b in blocks]), ids)
    np.testing.assert_array_equal(np.concatenate([b.feats for b in blocks], axis=1), feats)
    np.testing.assert_array_equal(np.concatenate([b.q for b in blocks], axis=1), q)
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert m["format"] == "tda-feature-store" and m["fingerprint"] == "fp1"
    assert (m["n"], m["k"], m["dtype"], m["shard_size"], m["checkpoints"]) == (250, 16, "float32", 100, [0, 1])
    assert len(m["complete"]) == 3 + 2 * 2 * 3  # ids per shard + features and q per (ckpt, shard)
    rec = m["complete"]["features/1/2"]
    assert rec["rows"] == 50 and rec["file"] == "features/ckpt-001/shard-00002.npy" and len(rec["sha256"]) == 64
    reopened.verify()
    assert not list((tmp_path / "store").rglob("*.tmp"))


def test_float16_store(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path, dtype="float16")
    _fill(store, feats, q, ids)
    got = np.concatenate([b.feats for b in store.iter_blocks()], axis=1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, feats, rtol=1e-3, atol=1e-3)


def test_resume_skips_done_and_reuses(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path)
    store.write_shard(0, 1, ids[100:200], feats[0, 100:200], q[0, 100:200])
    again = make(tmp_path)  # same fingerprint: reopened, progress kept
    assert (0, 1) not in again.pending() and len(again.pending()) == 5
    with pytest.raises(StoreError, match="incomplete"):
        next(again.iter_blocks())


def test_fingerprint_mismatch_and_foreign(tmp_path):
    make(tmp_path)
    with pytest.raises(FingerprintMismatchError, match="seed"):
        make(tmp_path, fingerprint="fp2", spec={"k": 16, "seed": 1})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(ForeignStoreError, match="not a tda store"):
        FeatureStore.create(foreign, n=10, k=4, checkpoints=[0], shard_size=5, fingerprint="x", spec={})
    with pytest.raises(ForeignStoreError):
        FeatureStore.open(foreign)
    assert (foreign / "notes.txt").read_text() == "hello"


def test_corrupt_manifest_and_truncated_shard(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path)
    _fill(store, feats, q, ids)
    path = shard_path(store.root, "features", 1, 0)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(StoreCorruptError, match="truncated"):
        list(FeatureStore.open(store.root).iter_blocks())
    (store.root / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorruptError, match="not valid JSON"):
        FeatureStore.open(store.root)


def test_flipped_bytes_fail_verify(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path)
    _fill(store, feats, q, ids)
    path = shard_path(store.root, "q", 0, 2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="checksum"):
        store.verify()


def test_bad_writes_leave_store_intact(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path)
    store.write_shard(0, 0, ids[:100], feats[0, :100], q[0, :100])
    before = (store.root / "manifest.json").read_text()
    bad = feats[0, 100:200].copy()
    bad[3, 2] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        store.write_shard(0, 1, ids[100:200], bad, q[0, 100:200])
    with pytest.raises(ShapeError):
        store.write_shard(0, 1, ids[100:200], feats[0, 100:200, :8], q[0, 100:200])
    with pytest.raises(StoreCorruptError, match="rows"):
        store.write_shard(0, 1, ids[100:150], feats[0, 100:150], q[0, 100:150])
    with pytest.raises(StoreCorruptError, match="ids"):  # data order changed between checkpoints
        store.write_shard(1, 0, ids[:100][::-1], feats[1, :100], q[1, :100])
    assert json.loads((store.root / "manifest.json").read_text())["complete"].keys() == json.loads(before)["complete"].keys()
    np.testing.assert_array_equal(np.load(shard_path(store.root, "features", 0, 0)), feats[0, :100])


def test_worker_writes_then_driver_records(tmp_path, data):
    feats, q, ids = data
    store = make(tmp_path)
    records = write_shard_files(store.root, 1, 2, ids[200:], feats[1, 200:], q[1, 200:])
    assert not store.is_done(1, 2)  # files alone do not complete a shard
    store.record(records)
    assert FeatureStore.open(store.root).is_done(1, 2)


def test_lock_refuses_second_writer(tmp_path):
    with StoreLock(tmp_path / "s"):
        with pytest.raises(StoreLockedError, match="another process"):
            StoreLock(tmp_path / "s").acquire()
    with StoreLock(tmp_path / "s"):  # released: can be taken again
        pass


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    import socket
    lock = tmp_path / "s" / ".lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    with StoreLock(tmp_path / "s") as held:
        assert held.held


def test_repair_never_touches_files_outside_the_store(tmp_path) -> None:
    """A manifest record naming ``../x`` or an absolute path is corrupt; repair deletes only
    files inside the store (issue: --repair deleted files outside the run folder)."""
    import json

    from stores import FeatureStore
    from stores.feature_store import write_shard_files

    outside, absolute = tmp_path / "precious.txt", tmp_path / "other.txt"
    outside.write_text("keep")
    absolute.write_text("keep")
    store = FeatureStore.create(tmp_path / "store", n=4, k=2, checkpoints=[0], shard_size=4, fingerprint="f", spec={})
    store.record(write_shard_files(store.root, 0, 0, np.arange(4), np.ones((4, 2), np.float32),
                                   np.ones(4, np.float32), "float32"))
    manifest = json.loads((store.root / "manifest.json").read_text())
    keys = sorted(manifest["complete"])
    manifest["complete"][keys[0]]["file"] = "../precious.txt"
    manifest["complete"][keys[1]]["file"] = str(absolute)
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    dropped = FeatureStore.open(store.root).repair()
    assert set(keys[:2]) <= set(dropped)
    assert outside.read_text() == "keep" and absolute.read_text() == "keep"
