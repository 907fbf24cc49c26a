"""Reliability catalogue: bad inputs raise a specific error naming the fix, and never damage what is stored.

Every case checks three things: the exact exception class of the ``tda.errors`` hierarchy (for
CLI cases, the class name printed by ``tda``), a message that says how to fix it, and a snapshot
(sha256 of every file) of the store or run folder taken before the bad call that is unchanged
after it. Store-level cases use a seeded 5-7-3 MLP on synthetic data; pipeline cases copy one
tiny MNIST run (configs/tiny.yaml) made once per module.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from pipelines.cli.main import main
from pipelines.config import load_config, scorer_fingerprint
from pipelines.families.base import gradient_featurizer
from pipelines.run import RunPaths
from pipelines.stages import open_store
from stores import FaissIndex, FeatureStore, StoreLock, shard_path
from tda import errors as E
from tda.data.loading import iter_batches
from tda.featurizers.gradient import Featurizer, load_checkpoint
from tda.models.reference import mlp
from tda.models.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
TINY = ROOT / "configs" / "tiny.yaml"
SETS = ["--set", f"data.root={MNIST}", "--quiet"]


# --------------------------------------------------------------------------------------------
# helpers


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative paths), to prove nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(argv: list[str], capsys) -> tuple[str, str]:
    """Run ``tda ARGV`` in process; return (exception class name, message) of its error."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tda: error: " in err, err
    err = err[err.index("tda: error: "):].strip()
    name, _, message = err[len("tda: error: "):].partition(": ")
    return name, message


def raises_exactly(cls: type, match: str):
    """``pytest.raises`` that also insists on the exact class (not a parent or a sibling)."""

    class _Exact:
        def __enter__(self):
            self.ctx = pytest.raises(cls, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self.ctx.__exit__(*exc)
            assert type(self.info.value) is cls, f"{type(self.info.value).__name__} raised, {cls.__name__} expected"
            return out

    return _Exact()


def collate(rows) -> dict[str, torch.Tensor]:
    return {"x": torch.as_tensor(np.stack(list(rows["x"])).astype(np.float32)),
            "y": torch.as_tensor(np.array(rows["y"], dtype=np.int64))}


def featurize_shard(store: FeatureStore, featurizer: Featurizer, state, ds, shard: int, checkpoint: int = 0,
                    collate_fn=collate) -> None:
    """What the featurize stage does for one (checkpoint, shard)."""
    lo, hi = store.shard_rows(shard)
    parts = list(featurizer.featurize(state, checkpoint, iter_batches(ds, collate_fn, 8, lo, hi)))
    store.write_shard(checkpoint, shard, *(np.concatenate(p) for p in zip(*parts)))


@pytest.fixture
def syn(tmp_path, tiny_data):
    """A 40-example synthetic data set and a store whose shard 0 (of 2) is already written."""
    x, y = tiny_data(40)
    ds = datasets.Dataset.from_dict({"id": np.arange(40) * 10 + 3, "x": x.numpy().tolist(), "y": y.numpy()})
    torch.manual_seed(0)
    model = mlp(5, (7,), 3).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    featurizer = Featurizer(model, ClassificationTask(), k=8, seed=0)
    store = FeatureStore.create(tmp_path / "store", n=40, k=8, checkpoints=[0], shard_size=20,
                                fingerprint="fp", spec=featurizer.spec())
    featurize_shard(store, featurizer, state, ds, 0)
    return SimpleNamespace(ds=ds, state=state, featurizer=featurizer, store=store, root=store.root,
                           before=snapshot(store.root))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    if not MNIST.is_dir():
        pytest.skip(f"MNIST idx files not found in {MNIST}")
    out = tmp_path_factory.mktemp("reliability") / "tiny"
    assert main(["run", str(TINY), "--out", str(out), *SETS]) == 0
    return out


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the finished tiny run."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def run_args(run: Path, *extra: str) -> list[str]:
    return ["run", str(TINY), "--out", str(run), *SETS, *extra]


def forget_last_shard(run: Path, checkpoint: int = 1) -> None:
    """Make featurization pending again for one (checkpoint, shard), as after an interruption."""
    path = run / "features-train" / "manifest.json"
    m = json.loads(path.read_text())
    last = max(int(k.split("/")[2]) for k in m["complete"])
    for kind in ("features", "q"):
        m["complete"].pop(f"{kind}/{checkpoint}/{last}")
    path.write_text(json.dumps(m))


# --------------------------------------------------------------------------------------------
# batches and features: shapes, dtypes, non-finite values, empty data, duplicate ids


BAD_BATCHES = {
    "inputs of the wrong width": (lambda r: {**collate(r), "x": collate(r)["x"][:, :4]},
                                  E.ShapeError, "shape the model expects"),
    "inputs of the wrong dtype": (lambda r: {**collate(r), "x": collate(r)["x"].double()},
                                  E.DTypeError, "model's dtype"),
    "a numpy array instead of a tensor": (lambda r: {**collate(r), "x": collate(r)["x"].numpy()},
                                          E.DTypeError, "torch.from_numpy"),
    "labels for fewer examples than ids": (lambda r: {**collate(r), "y": collate(r)["y"][:-1]},
                                           E.ShapeError, "one row per example"),
    "a label beyond the last class": (lambda r: {**collate(r), "y": collate(r)["y"] + 3},
                                      E.DataError, "labels"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batches(syn, case):
    bad_collate, cls, fix = BAD_BATCHES[case]
    with raises_exactly(cls, fix):
        featurize_shard(syn.store, syn.featurizer, syn.state, syn.ds, 1, collate_fn=bad_collate)
    assert snapshot(syn.root) == syn.before and syn.store.pending() == [(0, 1)]


def test_features_of_wrong_k_or_dtype_are_refused(syn):
    rows = syn.store.shard_rows(1)[1] - syn.store.shard_rows(1)[0]
    ids, q = syn.ds["id"][20:40], np.ones(rows, np.float32)
    with raises_exactly(E.ShapeError, "featurize with k=8"):
        syn.store.write_shard(0, 1, ids, np.zeros((rows, 16), np.float32), q)
    with raises_exactly(E.DTypeError, "floating-point"):
        syn.store.write_shard(0, 1, ids, np.zeros((rows, 8), np.int32), q)
    with raises_exactly(E.DTypeError, "integer 'id' column"):
        syn.store.write_shard(0, 1, np.asarray(ids, np.float64) + 0.5, np.zeros((rows, 8), np.float32), q)
    assert snapshot(syn.root) == syn.before


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_give_non_finite_error_and_store_nothing(syn, value):
    bad = {k: v.clone() for k, v in syn.state.items()}
    bad["0.weight"][2, 1] = value
    with raises_exactly(E.NonFiniteError, "NaN weights"):
        featurize_shard(syn.store, syn.featurizer, bad, syn.ds, 1)
    assert snapshot(syn.root) == syn.before


def test_infinite_features_are_refused_by_the_store(syn):
    feats = np.ones((20, 8), np.float32)
    feats[4, 4] = np.inf
    with raises_exactly(E.NonFiniteFeaturesError, "fix the featurizer input"):
        syn.store.write_shard(0, 1, syn.ds["id"][20:40], feats, np.ones(20, np.float32))
    assert snapshot(syn.root) == syn.before


def test_empty_data(syn):
    with raises_exactly(E.DataError, "empty"):
        list(syn.featurizer.featurize(syn.state, 0, iter_batches(syn.ds.select([]), collate)))
    with raises_exactly(E.StoreError, "n, k, shard_size >= 1"):
        FeatureStore.create(syn.root.parent / "empty", n=0, k=8, checkpoints=[0], shard_size=4,
                            fingerprint="fp", spec={})
    assert not (syn.root.parent / "empty").exists()


def test_duplicate_ids_in_data_and_across_shards(syn):
    dup = syn.ds.map(lambda r, i: {"id": 3 if i == 25 else r["id"]}, with_indices=True)
    with raises_exactly(E.DuplicateIdError, "give every row its own integer id"):
        featurize_shard(syn.store, syn.featurizer, syn.state, dup, 1)
    # shard 1 claiming the ids of shard 0: every id would appear twice in the store
    first = syn.store.read_shard(0)
    with raises_exactly(E.DuplicateIdError, "unique id"):
        syn.store.write_shard(0, 1, first.ids, first.feats[0], first.q[0])
    assert snapshot(syn.root) == syn.before
    featurize_shard(syn.store, syn.featurizer, syn.state, syn.ds, 1)  # the store still takes the right shard
    np.testing.assert_array_equal(syn.store.ids(), np.arange(40) * 10 + 3)


def test_rewriting_a_complete_shard_is_refused(syn):
    blk = syn.store.read_shard(0)
    with raises_exactly(E.StoreError, "append-only"):
        syn.store.write_shard(0, 0, blk.ids, blk.feats[0] * 2, blk.q[0])
    assert snapshot(syn.root) == syn.before


# --------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_of_another_architecture(syn):
    torch.manual_seed(1)
    wider = mlp(5, (9,), 3).state_dict()
    with raises_exactly(E.CheckpointError, "architecture the checkpoint was trained with"):
        featurize_shard(syn.store, syn.featurizer, wider, syn.ds, 1)
    assert snapshot(syn.root) == syn.before


class _Payload:
    """Unpickling this object runs code (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_object_checkpoint_is_never_unpickled(tmp_path):
    marker, path = tmp_path / "was-unpickled", tmp_path / "evil.pt"
    torch.save({"0.weight": _Payload(marker)}, path)
    with raises_exactly(E.CheckpointError, r"torch.save\(model.state_dict\(\), path\)"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_checkpoint_in_a_run_is_refused_before_unpickling(run, tmp_path, capsys):
    forget_last_shard(run)
    marker = tmp_path / "was-unpickled"
    ckpt = run / "checkpoints" / "model-01-epoch-001.pt"
    with open(ckpt, "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    listing = json.loads((run / "checkpoints" / "checkpoints.json").read_text())  # the sha256 check passes
    for entry in listing["all"] + listing["checkpoints"]:
        if entry["file"] == ckpt.name:
            entry["sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (run / "checkpoints" / "checkpoints.json").write_text(json.dumps(listing))
    before = snapshot(run)
    name, msg = cli_error(run_args(run), capsys)  # the forgotten shard makes featurize load the checkpoint
    assert name == "CheckpointError" and "weights-only state dict" in msg and "torch.save" in msg
    assert not marker.exists() and snapshot(run) == before


def test_checkpoint_replaced_after_training(run, capsys):
    forget_last_shard(run)
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "model-00-epoch-001.pt", ckpts / "model-01-epoch-001.pt")  # same shapes, other weights
    before = snapshot(run)
    name, msg = cli_error(run_args(run), capsys)  # the forgotten shard makes featurize load the checkpoint
    assert name == "CheckpointError" and "changed since training" in msg and "restore it" in msg
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------------
# appending with another projection, damaged stores, foreign folders


def test_other_projection_seed_or_k_is_refused(run, capsys):
    before = snapshot(run)
    name, msg = cli_error(run_args(run, "--set", "featurize.seed=1"), capsys)
    assert name == "FingerprintMismatchError" and "--overwrite" in msg
    cfg = load_config(TINY, [f"data.root={MNIST}", "featurize.seed=1"])
    featurizer = gradient_featurizer(cfg, mlp(784, tuple(cfg.model.hidden), 10), ClassificationTask())
    with raises_exactly(E.FingerprintMismatchError, r"differs in \['seed'\].*use another store folder"):
        open_store(cfg, RunPaths(run), "train", cfg.data.train_size, featurizer.spec())
    # same fingerprint, other k: the manifest's own settings are compared too
    store = FeatureStore.open(run / "features-train")
    with raises_exactly(E.FingerprintMismatchError, "k: stored 64, asked 32"):
        FeatureStore.create(store.root, n=store.n, k=32, checkpoints=store.checkpoints,
                            shard_size=store.manifest["shard_size"], fingerprint=store.manifest["fingerprint"],
                            spec=store.manifest["spec"])
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_shard_is_detected_and_repaired(run, tiny_run, damage, capsys):
    path = shard_path(run / "features-train", "features", 1, 1)
    raw = bytearray(path.read_bytes())
    if damage == "flipped byte":
        raw[-5] ^= 0x40  # same size: only the sha256 in the manifest can tell
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    shutil.rmtree(run / "index")
    shutil.rmtree(run / "scores")
    before = snapshot(run)
    expect = "does not match its checksum" if damage == "flipped byte" else "truncated"
    with raises_exactly(E.StoreCorruptError, expect + ".*--repair"):
        FeatureStore.open(run / "features-train").verify()
    name, msg = cli_error(run_args(run), capsys)
    assert name == "StoreCorruptError" and expect in msg and "--repair" in msg
    assert snapshot(run) == before
    assert main(run_args(run, "--repair")) == 0  # drops the bad shard, re-featurizes it, rebuilds the index
    FeatureStore.open(run / "features-train").verify()
    assert path.read_bytes() == (tiny_run / path.relative_to(run)).read_bytes()
    np.testing.assert_array_equal(np.load(run / "scores" / "scores.npy"), np.load(tiny_run / "scores" / "scores.npy"))


def test_foreign_folder_is_left_alone(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 not really a cat")
    (foreign / "manifest.json").write_text('{"album": "holiday"}')
    before = snapshot(foreign)
    name, msg = cli_error(["run", str(TINY), "--out", str(foreign), "--quiet"], capsys)  # the shipped data
    assert name == "ForeignStoreError" and "choose an empty out_dir" in msg
    name, msg = cli_error(["query", "--run", str(foreign), "--example", "1"], capsys)
    assert name == "ForeignStoreError" and "tda run CONFIG" in msg
    with raises_exactly(E.ForeignStoreError, "not written by a tda feature store"):
        FeatureStore.open(foreign)
    (foreign / "manifest.json").unlink()
    before = snapshot(foreign)
    with raises_exactly(E.ForeignStoreError, "choose an empty or new folder"):
        FeatureStore.create(foreign, n=4, k=2, checkpoints=[0], shard_size=2, fingerprint="x", spec={})
    assert snapshot(foreign) == before


def test_corrupt_manifest_and_run_file(run, capsys):
    manifest = run / "features-train" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    before = snapshot(run)
    name, msg = cli_error(run_args(run), capsys)
    assert name == "StoreCorruptError" and "not valid JSON" in msg and "restore the file" in msg
    assert snapshot(run) == before
    (run / "run.json").write_text("{")
    name, msg = cli_error(run_args(run), capsys)
    assert name == "StoreCorruptError" and "run.json is not valid JSON" in msg and "--overwrite" in msg
    name, _ = cli_error(["query", "--run", str(run), "--example", "1"], capsys)
    assert name == "StoreCorruptError"
    assert snapshot(run) == {**before, "run.json": hashlib.sha256(b"{").hexdigest()}


# --------------------------------------------------------------------------------------------
# configuration and data paths


@pytest.mark.parametrize("yaml_text, override, fix", [
    ("featurise:\n  k: 8\n", None, "did you mean 'featurize'"),
    ("featurize:\n  shard_szie: 8\n", None, "did you mean 'shard_size'"),
    ("score: {}\n", "score.topK=3", "did you mean 'topk'"),
], ids=["section typo", "key typo", "override typo"])
def test_unknown_config_keys_suggest_the_closest(tmp_path, capsys, yaml_text, override, fix):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    name, msg = cli_error(["run", str(cfg), "--out", str(out), *(["--set", override] if override else [])], capsys)
    assert name == "ConfigError" and fix in msg
    assert not out.exists()


@pytest.mark.parametrize("override, fix", [
    ("featurize.k=abc", "featurize.k must be of type int, got 'abc'"),
    ("featurize.k=true", "featurize.k must be of type int"),
    ("model.hidden=16", "model.hidden must be a list"),
    ("train.lr=[0.1]", "train.lr must be of type float"),
    ("featurize.dtype=float64", "choose one of ('float32', 'float16')"),
], ids=["str for int", "bool for int", "int for list", "list for float", "unknown choice"])
def test_wrong_config_value_types(tmp_path, capsys, override, fix):
    out = tmp_path / "out"
    name, msg = cli_error(["run", str(TINY), "--out", str(out), "--set", override], capsys)
    assert name == "ConfigError" and fix in msg
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "out"
    name, msg = cli_error(["run", str(TINY), "--out", str(out), "--set", f"data.root={tmp_path / 'nowhere'}"], capsys)
    assert name == "DataError" and "set data.root" in msg
    assert not out.exists()  # refused before any work: no run folder is left behind


# --------------------------------------------------------------------------------------------
# queries, locks, the FAISS index


def test_query_for_an_unknown_example(run, capsys):
    before = snapshot(run)
    name, msg = cli_error(["query", "--run", str(run), "--example", "999999"], capsys)
    assert name == "QueryError" and "not in the query split" in msg and "pick an id from that range" in msg
    name, msg = cli_error(["query", "--run", str(run), "--example", "3", "-k", "0"], capsys)
    assert name == "QueryError" and "-k must be between 1 and the 300" in msg
    assert snapshot(run) == before


def test_second_writer_is_refused(run, capsys):
    with StoreLock(run):
        before = snapshot(run)
        name, msg = cli_error(run_args(run, "--from", "index"), capsys)
        assert name == "StoreLockedError" and "wait for it to finish" in msg
        assert str(socket.gethostname()) in msg and snapshot(run) == before
    assert not (run / ".lock").exists()


def test_index_of_another_configuration_or_dimension(run, capsys):
    cfg = load_config(TINY, [f"data.root={MNIST}"])
    fp = scorer_fingerprint(cfg)
    # an index of other vectors (dimension 10) that claims this run's fingerprint
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((300, 10)).astype(np.float32)
    FaissIndex.build([(np.arange(300), vec)], 10, meta={"fingerprint": fp}).save(run / "index")
    before = snapshot(run)
    name, msg = cli_error(["query", "--run", str(run), "--example", "3"], capsys)
    assert name == "IndexMismatchError" and "10-dimensional" in msg and "--from index" in msg
    # an index of the right dimension whose metadata names another configuration
    shutil.rmtree(run / "scores")
    meta = json.loads((run / "index" / "index.json").read_text())
    FaissIndex.build([(np.arange(300), np.zeros((300, 128), np.float32))], 128,
                     meta={**meta, "fingerprint": "another-config"}).save(run / "index")
    before = snapshot(run)
    name, msg = cli_error(run_args(run, "--only", "score"), capsys)
    assert name == "IndexMismatchError" and "another-config" in msg and "--from index" in msg
    assert snapshot(run) == before


def test_damaged_index_and_missing_scorer(run, capsys):
    (run / "index" / "index.faiss").write_bytes(b"garbage" * 10)
    before = snapshot(run)
    name, msg = cli_error(["query", "--run", str(run), "--example", "3"], capsys)
    assert name == "StoreCorruptError" and "rebuild the index" in msg
    (run / "scorer" / "state.npz").unlink()
    shutil.rmtree(run / "scores")
    before = snapshot(run)
    name, msg = cli_error(run_args(run, "--only", "score"), capsys)
    assert name == "StoreError" and "--from index" in msg
    assert snapshot(run) == before
