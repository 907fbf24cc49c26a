"""Kill -9 and resume: an interrupted `tda run` picks up where it stopped and ends byte-identical.

The featurize and score stages of a tiny run (small shards and scoring blocks, so there are
many commit points) run in a subprocess that is SIGKILLed at a seeded random point while it
writes; the same command then resumes it (taking over the dead process's stale lock) and the
store, index and scores must equal those of an uninterrupted run in another folder: same ids,
once each, same feature bytes. Also: scoring resumes by block, its memory does not grow with
n_query * n_train, and a rerun of a finished run rewrites nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import pipelines.stages as stages
import pipelines.stages.score as score_stage
from pipelines.cli.main import main
from pipelines.config import parse_config
from pipelines.run import RunPaths
from stores import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
TINY = ROOT / "configs" / "tiny.yaml"
# small shards (38 train + 4 query commits) and scoring blocks (~76 commits): many kill points
SETS = ["--set", f"data.root={MNIST}", "--set", "featurize.shard_size=16", "--set", "featurize.batch_size=16",
        "--set", "score.block_rows=4", "--quiet"]
SEED = 20240611
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_argv(out: Path, *extra: str) -> list[str]:
    return ["run", str(TINY), "--out", str(out), *SETS, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (in process; torch uses one thread here and in the subprocesses)."""
    if not MNIST.is_dir():
        pytest.skip(f"MNIST idx files not found in {MNIST}")
    out = tmp_path_factory.mktemp("kill") / "reference"
    assert main(run_argv(out)) == 0
    return out


def _features_done(run: Path) -> int:
    n = 0
    for split in ("train", "query"):
        try:
            m = json.loads((run / f"features-{split}" / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        n += sum(k.startswith("features/") for k in m["complete"])
    return n


def _scores_done(run: Path) -> int:
    if (run / "scores" / "scores.json").is_file():
        return json.loads((run / "scores" / "scores.json").read_text())["n_train"]
    try:
        return int(json.loads((run / "scores" / "scores.progress.json").read_text())["cols"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_when(argv: list[str], progress, target: int, delay: float, timeout: float = 120.0) -> int | None:
    """Start ``tda ARGV``; SIGKILL it ``delay`` seconds after ``progress() >= target`` (so the kill lands
    anywhere in the next unit of work, often inside a file write). Return the progress at the kill,
    or None when the process finished first (the caller retries with an earlier point)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli.main", *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if progress() >= target:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                if proc.wait() == -signal.SIGKILL:
                    return progress()
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    err = log.read().decode(errors="replace")
    log.close()
    assert proc.returncode == 0, f"run failed before the kill point: {err[-2000:]}"
    return None


def killed_then_resumed(out: Path, argv: list[str], progress, total: int, targets: list[int], reset,
                        rng: random.Random) -> int:
    """Kill at the first target reached before the work is done, check the debris, resume with the same command."""
    for target in targets:
        reset()
        at = kill_when(argv, progress, target, delay=rng.uniform(0.0, 0.03))
        if at is not None and at < total:
            break
    else:
        pytest.fail(f"the run always finished before the kill points {targets}")
    lock = json.loads((out / ".lock").read_text())  # left behind by the killed writer
    with pytest.raises(ProcessLookupError):
        os.kill(lock["pid"], 0)
    resumed = subprocess.run([sys.executable, "-m", "pipelines.cli.main", *argv], cwd=ROOT, env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (out / ".lock").exists() and not list(out.rglob(".*.tmp"))
    return at


def assert_same_store(store: Path, ref: Path) -> None:
    """Manifest equal, every recorded file byte-identical, no unrecorded file, ids unique and complete."""
    m, r = (json.loads((p / "manifest.json").read_text()) for p in (store, ref))
    assert m == r
    files = {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()}
    assert files == {rec["file"] for rec in m["complete"].values()} | {"manifest.json"}
    for rec in m["complete"].values():
        assert (store / rec["file"]).read_bytes() == (ref / rec["file"]).read_bytes(), rec["file"]
    ids = FeatureStore.open(store).ids()
    assert len(ids) == m["n"] and len(np.unique(ids)) == len(ids)
    np.testing.assert_array_equal(ids, FeatureStore.open(ref).ids())


def assert_same_outputs(run: Path, ref: Path) -> None:
    assert (run / "index" / "index.faiss").read_bytes() == (ref / "index" / "index.faiss").read_bytes()
    assert (run / "scores" / "scores.npy").read_bytes() == (ref / "scores" / "scores.npy").read_bytes()
    with np.load(run / "scores" / "topk.npz") as a, np.load(ref / "scores" / "topk.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    assert not (run / "scores" / "scores.partial.npy").exists() and not (run / "scores" / "scores.progress.json").exists()


def test_featurize_killed_mid_write_resumes_identically(reference, tmp_path):
    out = tmp_path / "run"
    argv = run_argv(out, "--only", "featurize")
    total = _features_done(reference)  # 2 checkpoints x (19 train + 2 query shards)
    rng = random.Random(SEED)

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shutil.copy(reference / "run.json", out / "run.json")
        shutil.copytree(reference / "checkpoints", out / "checkpoints")

    targets = [rng.randint(1, total - 2), rng.randint(1, total // 4), 1]
    at = killed_then_resumed(out, argv, lambda: _features_done(out), total, targets, reset, rng)
    assert 1 <= at < total
    for split in ("train", "query"):
        assert_same_store(out / f"features-{split}", reference / f"features-{split}")
    assert main(run_argv(out, "--from", "index")) == 0
    assert_same_outputs(out, reference)


def test_score_killed_mid_write_resumes_identically(reference, tmp_path):
    out = tmp_path / "run"
    n_train = FeatureStore.open(reference / "features-train").n
    rng = random.Random(SEED + 1)

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(reference, out, ignore=shutil.ignore_patterns("scores"))

    targets = [rng.randint(4, n_train - 40), rng.randint(4, n_train // 4), 4]
    at = killed_then_resumed(out, run_argv(out, "--only", "score"), lambda: _scores_done(out), n_train, targets, reset, rng)
    assert 4 <= at < n_train
    assert_same_outputs(out, reference)


def test_score_resumes_by_block_and_rerun_rewrites_nothing(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("scores"))
    computed: list[int] = []
    real = score_stage.iter_score_blocks

    def crashing(*args, **kwargs):
        for ids, block in real(*args, **kwargs):
            if len(computed) == 30:
                raise RuntimeError("simulated crash after 30 blocks")
            computed.append(len(ids))
            yield ids, block

    monkeypatch.setattr(score_stage, "iter_score_blocks", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(run_argv(out))
    assert _scores_done(out) == sum(computed) == 30 * 4
    computed.clear()
    monkeypatch.setattr(score_stage, "iter_score_blocks", lambda *a, **kw: (computed.append(len(x[0])) or x for x in real(*a, **kw)))
    assert main(run_argv(out)) == 0
    assert sum(computed) == FeatureStore.open(out / "features-train").n - 30 * 4  # only the rest was scored
    assert_same_outputs(out, reference)
    # a rerun of the finished run skips every stage: no output is rewritten (run.json is re-claimed)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"}
    computed.clear()
    assert main(run_argv(out)) == 0
    assert not computed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.json"} == stamps


def test_score_memory_does_not_grow_with_the_score_matrix(tmp_path):
    """Scores of 300 queries x 60,000 training examples (72 MB) go to a memmap block by block."""
    n_train, n_query, k = 60_000, 300, 4
    cfg = parse_config({"featurize": {"k": k, "shard_size": 20_000}, "score": {"block_rows": 2_000, "topk": 5}})
    paths = RunPaths(tmp_path / "run")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("query", n_query)):
        store = FeatureStore.create(paths.store(split), n=n, k=k, checkpoints=[0], shard_size=20_000,
                                    fingerprint=split, spec={})
        for s in range(store.n_shards):
            lo, hi = store.shard_rows(s)
            store.write_shard(0, s, np.arange(lo, hi), rng.standard_normal((hi - lo, k)).astype(np.float32),
                              rng.random(hi - lo).astype(np.float32))
    stages.stage_index(cfg, paths, progress=False)
    tracemalloc.start()
    try:
        stages.stage_score(cfg, paths, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = n_query * n_train * 4
    assert peak < full / 4, f"peak traced memory {peak / 1e6:.1f} MB for a {full / 1e6:.0f} MB score matrix"
    scores = np.load(paths.scores / "scores.npy", mmap_mode="r")
    assert scores.shape == (n_query, n_train)
    train = FeatureStore.open(paths.store("train")).read_shard(2)
    query = FeatureStore.open(paths.store("query")).read_shard(0)
    scorer = stages.load_scorer(cfg, paths)
    expect = scorer.transform_query(query) @ scorer.transform_train(train).T
    np.testing.assert_allclose(scores[:, 40_000:], expect, rtol=1e-5, atol=1e-6)
