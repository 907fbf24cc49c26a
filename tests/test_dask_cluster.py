"""A run with relative paths through a real dask cluster started from another working directory.

The scheduler and two worker processes are started with the ``dask scheduler`` / ``dask worker``
entry points on the loopback address (not a LocalCluster, which shares the driver's working
directory), their working directory a folder of their own. The config's ``data.root`` and
``out_dir`` are relative; the driver runs from a third folder. Every path a job carries must
therefore be absolute, or a worker resolves it against its own working directory. The features
and scores must equal those of a local run of the same config, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from tda.data.loading import DEMO_DATA

MNIST = DEMO_DATA / "mnist"  # the copy shipped with tda (the first 10,000 train / 2,000 test images)
pytestmark = [pytest.mark.dask,
              pytest.mark.skipif(not MNIST.is_dir(), reason=f"the shipped MNIST idx files are missing from {MNIST}")]

# 200 train rows in shards of 64 -> 4 shards, 16 queries -> 1 shard; x 2 checkpoints = 10 jobs
CONFIG = """\
name: cluster
out_dir: runs/dask                 # relative to the working directory
data:
  root: data/mnist                 # relative to this file's folder
  subset: first
  train_size: 200
  query_size: 16
model:
  hidden: [16]
train:
  models: 2
  epochs: 1
featurize:
  k: 32
  batch_size: 64
  shard_size: 64
score:
  topk: 5
  show: 1
"""
STARTUP_S = 60  # scheduler up and both workers connected (each worker imports torch when the first job arrives)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group we started (a worker's nanny and its worker process), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may outlive its leader (a nanny's child): kill what is left
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


@pytest.fixture
def cluster(tmp_path):
    """``(address, worker folder)`` of a scheduler and two single-thread workers on 127.0.0.1,
    started in ``tmp_path/elsewhere``; every process is stopped on teardown, also on failure."""
    from distributed import Client

    where = tmp_path / "elsewhere"
    where.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []

    def start(name: str, module: str, *args: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=where, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))

    def logs_text() -> str:
        return "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in sorted(logs.glob("*.log")))

    try:
        start("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
              "--no-dashboard", "--scheduler-file", str(sched_file), "--idle-timeout", "300")
        for i in range(2):
            start(f"worker-{i}", "distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                  "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1", "--memory-limit", "2GiB",
                  "--no-dashboard", "--local-directory", str(where / f"space-{i}"), "--death-timeout", "60",
                  "--name", f"w{i}")
        deadline = time.monotonic() + STARTUP_S
        address = None
        while address is None:
            if procs[0].poll() is not None:
                pytest.fail(f"the dask scheduler exited with {procs[0].returncode}\n{logs_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the dask scheduler wrote no {sched_file} in {STARTUP_S}s\n{logs_text()}")
            try:
                address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        assert address.startswith("tcp://127.0.0.1:"), address
        with Client(address, timeout="20s") as client:
            try:
                client.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
            except (TimeoutError, asyncio.TimeoutError):
                pytest.fail(f"the two dask workers did not connect in {STARTUP_S}s\n{logs_text()}")
            assert set(client.run(os.getcwd).values()) == {str(where)}  # the workers work elsewhere
        yield address, where, logs_text
    finally:
        _stop(procs)
        leaked = [p.pid for p in procs if p.poll() is None]
        assert not leaked, f"dask processes {leaked} still running"


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for split in ("train", "query")
            for p in sorted((root / f"features-{split}").glob("**/*.npy"))}


def _sha256s(root: Path, split: str) -> dict[str, str]:
    complete = json.loads((root / f"features-{split}" / "manifest.json").read_text())["complete"]
    return {k: v["sha256"] for k, v in complete.items()}


def _featurized_on_workers(address: str) -> int:
    """Featurizers the workers built (each worker builds one per split it ran jobs of)."""
    from distributed import Client

    def count() -> int:
        from pipelines.stages import featurize

        return len(featurize._WORKER_FEATURIZERS)

    with Client(address, timeout="20s") as client:
        return sum(client.run(count).values())


def test_relative_config_on_a_cluster_started_elsewhere(tmp_path, monkeypatch, capsys, cluster):
    address, where, logs_text = cluster
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "mnist").symlink_to(MNIST, target_is_directory=True)
    config = project / "cfg.yaml"
    config.write_text(CONFIG)
    driver = tmp_path / "driver"  # a third working directory: neither the config's nor the workers'
    driver.mkdir()
    monkeypatch.chdir(driver)

    # out_dir (runs/dask, relative to the driver's working directory) from the config
    code = main(["run", str(config), "--set", "executor.kind=dask", "--set", f"executor.address={address}", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, f"tda run on the cluster failed:\n{err}\n{logs_text()}"
    assert f"dask ({address})" in out
    assert _featurized_on_workers(address) >= 1, "no featurize job ran on the cluster's workers"
    assert main(["run", str(config), "--set", "executor.kind=local", "--out", "runs/local", "--quiet"]) == 0

    local, remote = driver / "runs" / "local", driver / "runs" / "dask"
    assert not (where / "runs").exists(), "a worker wrote the run folder into its own working directory"
    a, b = _store_files(local), _store_files(remote)
    assert len(a) >= 20 and a.keys() == b.keys()  # (4 train + 1 query shards) x 2 checkpoints x (feats, q)
    assert all(a[name] == b[name] for name in a), "features computed on the cluster differ from local ones"
    for split in ("train", "query"):  # the manifests record the same files and checksums
        assert _sha256s(local, split) == _sha256s(remote, split)
    np.testing.assert_array_equal(np.load(local / "scores" / "scores.npy"), np.load(remote / "scores" / "scores.npy"))
    with np.load(local / "scores" / "topk.npz") as za, np.load(remote / "scores" / "topk.npz") as zb:
        assert za.files == zb.files
        for key in za.files:
            np.testing.assert_array_equal(za[key], zb[key])
