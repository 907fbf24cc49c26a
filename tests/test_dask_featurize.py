"""Featurization sharded over (checkpoint x shard) on a dask LocalCluster equals the local run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from pipelines.config import load_config
from pipelines.executors import LocalExecutor
from pipelines.run import RunPaths
from pipelines.stages import FeaturizeJob, stage_featurize
from stores import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")
# 3 train shards x 2 checkpoints + 1 query shard x 2 checkpoints = 8 jobs
TINY = ["--set", f"data.root={MNIST}", "--set", "featurize.shard_size=128", "--quiet"]


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for split in ("train", "query")
            for p in sorted((root / f"features-{split}").glob("**/*.npy"))}


@pytest.mark.dask
def test_dask_featurize_equals_local(tmp_path, capsys):
    config = str(ROOT / "configs" / "tiny.yaml")
    local = tmp_path / "local"
    assert main(["run", config, "--out", str(local), *TINY]) == 0
    remote = tmp_path / "dask"
    remote.mkdir()
    shutil.copytree(local / "checkpoints", remote / "checkpoints")  # the same trained models
    shutil.copy(local / "run.json", remote / "run.json")
    assert main(["run", config, "--out", str(remote), *TINY, "--from", "featurize",
                 "--set", "executor.kind=dask", "--set", "executor.workers=2"]) == 0
    a, b = _store_files(local), _store_files(remote)
    assert len(a) >= 16 and a.keys() == b.keys()
    assert all(a[name] == b[name] for name in a), "dask features differ from local features"
    for split in ("train", "query"):  # manifests record the same files and checksums
        ma = json.loads((local / f"features-{split}" / "manifest.json").read_text())["complete"]
        mb = json.loads((remote / f"features-{split}" / "manifest.json").read_text())["complete"]
        assert {k: v["sha256"] for k, v in ma.items()} == {k: v["sha256"] for k, v in mb.items()}
    np.testing.assert_array_equal(np.load(local / "scores" / "scores.npy"), np.load(remote / "scores" / "scores.npy"))
    with np.load(local / "scores" / "topk.npz") as za, np.load(remote / "scores" / "topk.npz") as zb:
        for key in za.files:
            np.testing.assert_array_equal(za[key], zb[key])


def test_featurize_job_is_small_and_resumes(tmp_path):
    """The job pickles to a few KB (config + path, never data or models); a shard whose files were
    written but never recorded is redone cleanly, and recorded shards are not redone."""
    import pickle

    config = str(ROOT / "configs" / "tiny.yaml")
    out = tmp_path / "run"
    assert main(["run", config, "--out", str(out), *TINY, "--only", "train"]) == 0
    cfg = load_config(config, [f"data.root={MNIST}", "featurize.shard_size=128"])
    paths = RunPaths(out)
    layout = {"n": 300, "shard_size": 128, "k": 64, "dtype": "float32"}
    files = {0: "model-00-epoch-001.pt", 1: "model-01-epoch-001.pt"}
    assert len(pickle.dumps(FeaturizeJob(cfg.to_dict(), str(out), "train", layout, files))) < 8192

    calls: list[tuple[str, tuple[int, int]]] = []

    class Counting(LocalExecutor):
        def map_unordered(self, fn, items):
            for item in items:
                calls.append((fn.split, item))
                yield item, fn(item)

    class StopAfter(LocalExecutor):
        """Runs two jobs, the second one's files written but its record lost (killed driver)."""

        def map_unordered(self, fn, items):
            items = list(items)
            yield items[0], fn(items[0])
            fn(items[1])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stage_featurize(cfg, paths, progress=False, executor=StopAfter())
    assert len(FeatureStore.open(paths.store("train")).pending()) == 5  # 6 train jobs, 1 recorded
    stage_featurize(cfg, paths, progress=False, executor=Counting())
    assert len(calls) == 5 + 2 and len(set(calls)) == len(calls)  # 5 train + 2 query jobs, none twice
    assert FeatureStore.open(paths.store("train")).is_complete()
    full = tmp_path / "full"
    assert main(["run", config, "--out", str(full), *TINY, "--only", "train"]) == 0
    stage_featurize(cfg, RunPaths(full), progress=False, executor=LocalExecutor())
    assert _store_files(out) == _store_files(full)
