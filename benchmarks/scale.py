"""Scale: FAISS exact vs IVF on a 1,000,000 x 512 store, and the whole pipeline on full MNIST.

Part ``faiss``: synthetic train-side vectors (seeded; written to ``--out`` once and reused) with
structure that makes approximate search meaningful: a low-rank signal (rank 64, decaying
spectrum) drawn from 1,000 unevenly sized clusters, isotropic noise holding 25% of the energy,
and log-normal row norms (per-example gradient norms vary widely, which is what makes
inner-product search differ from cosine search). Queries ``phi`` come from the same process with
another seed (the query side of Grad-Dot / TracIn); TRAK queries are ``(X^T X + lambda I)^-1 phi``
(the query side of TRAK, see tda/scorers/trak.py). ``stores.FaissIndex.build`` builds the exact
(flat inner product) index and the IVF index (the library default ``nlist = 4 sqrt(n)``: 4,000
cells at 1M) from 65,536-row blocks read off disk. Reported: build time, index memory (growth of
this process's anonymous memory) and file size, warm load time (what ``tda query`` pays on every
call), latency per query in a batch and for single queries (p50/p95), recall@10/@100 of IVF
against exact for several ``nprobe`` (16 is the library default).

Part ``pipeline``: ``configs/mnist_scale.yaml`` (60,000 training images, 10,000 test queries,
MLP 784-128-10, one model, k = 512, TRAK, flat index): train -> featurize -> index -> score with
the local executor into ``<out>/pipeline-local``, then featurize -> index -> score again into
``<out>/pipeline-dask`` with a dask LocalCluster of 2 worker processes (one thread each),
reusing the trained checkpoint (``checkpoints/`` and ``run.json`` are copied; the feature
fingerprint does not include the executor). Per stage: wall time, throughput, peak resident
memory of the driver and of each dask worker (the kernel's high-water mark, reset before each
stage through ``/proc/PID/clear_refs``; peak anonymous and file-backed memory sampled every
0.1 s); then whether the dask run's stored features, scores and top-k equal the local run's
bit for bit, and IVF recall on the run's real TRAK vectors (a check on the synthetic store).
With ``--part all`` each part runs in its own process, so peak memory is per part.

    nice -n 19 python benchmarks/scale.py                 # both parts (18-25 min on 2 shared cores)
    python benchmarks/scale.py --quick                    # small sizes, under a minute (smoke test)
    python benchmarks/scale.py --part faiss --nprobe 8 32 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
CONFIG = ROOT / "configs" / "mnist_scale.yaml"
GB = 1e9


# ------------------------------------------------------------------ process memory (Linux /proc)
def proc_memory(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (peak RSS), ``RssAnon``, ``RssFile`` of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    """Reset the kernel's peak-RSS mark (VmHWM, ``ru_maxrss``) of a process we own."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


class PeakMemory:
    """Peak memory of some processes over a region: exact peak RSS from the kernel's high-water
    mark, and peak anonymous / file-backed (memory-mapped files, reclaimable) RSS sampled every
    ``interval`` seconds in a background thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids, self.interval = pids, interval
        self.peak: dict[str, dict[str, int]] = {name: {"RssAnon": 0, "RssFile": 0} for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            mem = proc_memory(pid)
            for key in ("RssAnon", "RssFile"):
                self.peak[name][key] = max(self.peak[name][key], mem[key])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        for pid in self.pids.values():
            reset_peak(pid)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        for name, pid in self.pids.items():
            self.peak[name]["VmHWM"] = proc_memory(pid)["VmHWM"]


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------ part 1: FAISS
def synth_structure(dim: int, seed: int, rank: int = 64, clusters: int = 1000) -> dict[str, np.ndarray]:
    """Shared structure of the synthetic store: basis, cluster centres and weights, noise level."""
    rng = np.random.default_rng([seed, 0])
    rank = min(rank, dim)
    scales = (np.arange(rank) + 1.0) ** -0.5  # decaying spectrum
    basis = rng.standard_normal((dim, rank)) * scales / math.sqrt(dim)  # column j has norm ~scales[j]
    centres = rng.standard_normal((clusters, rank))
    weights = (np.arange(clusters) + 1.0) ** -0.7  # uneven cluster sizes
    signal = float(np.sum((basis ** 2).sum(axis=0)) * 1.09)  # E||basis z||^2, E z_j^2 = 1 + 0.3^2
    noise_sd = math.sqrt(signal / 3 / dim)  # noise = 25% of the energy
    return {"basis": basis.astype(np.float32), "centres": centres.astype(np.float32),
            "weights": weights / weights.sum(), "noise_sd": np.float32(noise_sd)}


def synth_block(structure: dict[str, np.ndarray], stream: int, block: int, rows: int) -> np.ndarray:
    """(rows, dim) float32 vectors of block ``block`` of stream ``stream`` (a pure function)."""
    rng = np.random.default_rng([stream, block])
    basis, centres = structure["basis"], structure["centres"]
    c = rng.choice(len(centres), size=rows, p=structure["weights"])
    z = centres[c] + np.float32(0.3) * rng.standard_normal((rows, centres.shape[1]), dtype=np.float32)
    x = z @ basis.T + structure["noise_sd"] * rng.standard_normal((rows, basis.shape[0]), dtype=np.float32)
    x *= rng.lognormal(0.0, 0.5, size=(rows, 1)).astype(np.float32)  # row norms vary ~e^(+-1)
    return x


def synth_store(folder: Path, n: int, dim: int, seed: int, block_rows: int) -> np.ndarray:
    """The (n, dim) train-side vectors as a read-only memmap, generated once block by block."""
    path = folder / f"vectors-{n}x{dim}-seed{seed}.npy"
    done = path.with_suffix(".json")
    spec = {"n": n, "dim": dim, "seed": seed, "block_rows": block_rows, "version": 1}
    if not (path.is_file() and done.is_file() and json.loads(done.read_text()) == spec):
        folder.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        structure = synth_structure(dim, seed)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        for b, lo in enumerate(tqdm(range(0, n, block_rows), desc="synthetic store", unit="block")):
            out[lo: lo + block_rows] = synth_block(structure, seed + 1, b, min(block_rows, n - lo))
        out.flush()
        del out
        done.write_text(json.dumps(spec))
    return np.load(path, mmap_mode="r")


def trak_queries(vectors: np.ndarray, phi: np.ndarray, block_rows: int, lambda_rel: float = 0.01) -> np.ndarray:
    """TRAK's query transform on the synthetic store: ``(X^T X + lambda I)^-1 phi`` (float64 solve),
    ``lambda = lambda_rel * mean diag(X^T X)`` as in :class:`tda.TRAKScorer`."""
    gram = np.zeros((vectors.shape[1],) * 2)
    for lo in tqdm(range(0, len(vectors), block_rows), desc="kernel X^T X", unit="block"):
        x = np.asarray(vectors[lo: lo + block_rows])
        gram += x.T @ x  # float32 per block, summed in float64
    gram[np.diag_indices_from(gram)] += lambda_rel * np.trace(gram) / len(gram)
    return np.linalg.solve(gram, phi.T.astype(np.float64)).T.astype(np.float32)  # (m, dim)


def blocks_of(vectors: np.ndarray, block_rows: int, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors)`` blocks read from the memmap, as a store's blocks would be."""
    for lo in tqdm(range(0, len(vectors), block_rows), desc=desc, unit="block"):
        hi = min(lo + block_rows, len(vectors))
        yield np.arange(lo, hi, dtype=np.int64), np.ascontiguousarray(vectors[lo:hi])


def build_timed(vectors: np.ndarray, kind: str, nlist: int | None, block_rows: int, folder: Path) -> tuple[Any, dict]:
    """Build, save and measure an index (time, anonymous-memory growth, file size)."""
    from stores import FaissIndex

    before = proc_memory(os.getpid())["RssAnon"]
    t0 = time.perf_counter()
    index = FaissIndex.build(blocks_of(vectors, block_rows, f"build {kind}"), vectors.shape[1], kind,
                             nlist=nlist, n_hint=len(vectors))
    build_s = time.perf_counter() - t0
    memory = proc_memory(os.getpid())["RssAnon"] - before
    index.save(folder / kind)
    return index, {"build_s": build_s, "memory": memory, "file": (folder / kind / "index.faiss").stat().st_size}


def latency(index: Any, queries: np.ndarray, singles: int, k: int = 10) -> dict[str, Any]:
    """ms/query for one batched search of all ``queries``, p50/p95 over ``singles`` one-query searches."""
    t0 = time.perf_counter()
    _, ids = index.search(queries, k)
    batch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    index.search(queries[:1], k)  # warm-up (thread pool start), not timed
    times = []
    for i in range(singles):
        t0 = time.perf_counter()
        index.search(queries[i: i + 1], k)
        times.append((time.perf_counter() - t0) * 1000)
    return {"ids": ids, "batch_ms": batch_ms, "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95))}


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of the exact top-``k`` that the approximate top-``k`` contains."""
    return float(np.mean([len(np.intersect1d(f[:k], e[:k])) / k for f, e in zip(found, exact)]))


def run_faiss(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from stores import FaissIndex

    faiss.omp_set_num_threads(args.threads)
    folder = Path(args.out) / "faiss"
    n, dim, nq = args.n_vectors, args.dim, args.queries
    print(f"\n== FAISS: {n:,} x {dim} float32 synthetic store ({n * dim * 4 / GB:.1f} GB), {nq} queries, "
          f"{args.threads} threads; load {load_avg()}", flush=True)
    vectors = synth_store(folder, n, dim, args.seed, args.block_rows)
    phi = synth_block(synth_structure(dim, args.seed), args.seed + 2, 0, nq)  # query gradients, as Grad-Dot uses them
    queries = {"phi": phi, "trak": trak_queries(vectors, phi, args.block_rows)}  # and as TRAK transforms them

    flat, built = build_timed(vectors, "flat", None, args.block_rows, folder)
    rows = [{"name": "flat (exact)", **built, **latency(flat, phi, args.singles_flat),
             "r10": 1.0, "r100": 1.0, "trak_r10": 1.0, "trak_r100": 1.0}]
    exact = {kind: flat.search(q, 100)[1] for kind, q in queries.items()}  # ground truth
    del flat
    ivf, built = build_timed(vectors, "ivf", args.nlist, args.block_rows, folder)
    nlist = ivf.meta["nlist"]
    for p in args.nprobe:
        ivf.index.nprobe = min(p, nlist)
        row = {"name": f"ivf{nlist} nprobe={p}", **(built if p == args.nprobe[0] else {}),
               **latency(ivf, phi, args.singles_ivf)}
        for kind, q in queries.items():
            found = ivf.search(q, 100)[1]  # its first 10 are the top-10 search's
            prefix = "" if kind == "phi" else "trak_"
            row.update({f"{prefix}r10": recall(found, exact[kind], 10), f"{prefix}r100": recall(found, exact[kind], 100)})
        rows.append(row)
    del ivf
    for kind, row in (("flat", rows[0]), ("ivf", rows[1])):
        t0 = time.perf_counter()
        loaded = FaissIndex.load(folder / kind)
        row["load_s"] = time.perf_counter() - t0
        del loaded
        if not args.keep:
            shutil.rmtree(folder / kind)
    print_faiss(rows, args)
    return {"rows": [{k: v for k, v in r.items() if k != "ids"} for r in rows], "load_end": load_avg()}


def print_faiss(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    anchor = rows[0]
    print(f"\nFAISS, {args.n_vectors:,} x {args.dim} synthetic (clustered low-rank + noise, log-normal norms), "
          f"{args.queries} queries, top-10, {args.threads} threads; latency with queries phi; recall with phi "
          "and with TRAK's K^-1 phi; speed-ups against exact (same run)")
    print(f"{'index':<22} {'build s':>8} {'mem GB':>7} {'file GB':>8} {'load s':>7} {'batch ms/q':>11} "
          f"{'1-query p50 ms':>15} {'p95 ms':>8} {'recall@10':>10} {'@100':>6} {'TRAK r@10':>10} {'@100':>6} "
          f"{'speed-up batch':>15} {'p50':>7}")
    for r in rows:
        def f(key: str, fmt: str, scale: float = 1.0) -> str:
            return format(r[key] / scale, fmt) if key in r else "-"

        print(f"{r['name']:<22} {f('build_s', '8.1f'):>8} {f('memory', '7.2f', GB):>7} {f('file', '8.2f', GB):>8} "
              f"{f('load_s', '7.2f'):>7} {r['batch_ms']:>11.3f} {r['p50_ms']:>15.3f} {r['p95_ms']:>8.3f} "
              f"{r['r10']:>10.3f} {r['r100']:>6.3f} {r['trak_r10']:>10.3f} {r['trak_r100']:>6.3f} "
              f"{anchor['batch_ms'] / r['batch_ms']:>14.1f}x {anchor['p50_ms'] / r['p50_ms']:>6.0f}x")


# ------------------------------------------------------------------ part 2: the pipeline at scale
def pipeline_config(args: argparse.Namespace, kind: str) -> Any:
    """``--config`` (configs/mnist_scale.yaml) with the executor ``kind`` and any size overrides."""
    from pipelines.config import load_config

    sets = [f"data.root={args.data}", f"executor.kind={kind}", f"executor.workers={args.workers}"]
    for key, name in (("data.train_size", "train_size"), ("data.query_size", "query_size"),
                      ("featurize.k", "k"), ("train.epochs", "epochs")):
        if getattr(args, name) is not None:
            sets.append(f"{key}={getattr(args, name)}")
    return load_config(args.config, sets)


def stage_row(name: str, run: Any, pids: dict[str, int], work: float) -> dict[str, Any]:
    """Run one stage under :class:`PeakMemory`; wall time, throughput (``work`` / s), peaks."""
    with PeakMemory(pids) as mem:
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
    return {"stage": name, "seconds": seconds, "rate": work / seconds, "memory": mem.peak}


def run_local(cfg: Any, root: Path) -> list[dict[str, Any]]:
    """train -> featurize -> index -> score with the local executor into a fresh ``root``."""
    from pipelines.run import RunPaths, claim_run_dir
    from pipelines.stages import stage_featurize, stage_index, stage_score, stage_train
    from stores import StoreLock

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths, pids = RunPaths(root), {"driver": os.getpid()}
    n, m = cfg.data.train_size, cfg.data.query_size
    with StoreLock(root):
        claim_run_dir(cfg, root, overwrite=False)
        return [stage_row("train", lambda: stage_train(cfg, paths), pids, n * cfg.train.epochs * cfg.train.models),
                stage_row("featurize", lambda: stage_featurize(cfg, paths), pids, n + m),
                stage_row("index", lambda: stage_index(cfg, paths), pids, n),
                stage_row("score", lambda: stage_score(cfg, paths), pids, n * m)]


def run_dask(cfg: Any, root: Path, trained: Path) -> tuple[list[dict[str, Any]], float]:
    """featurize (sharded on a dask LocalCluster) -> index -> score into a fresh ``root``, reusing
    the checkpoint trained in ``trained``; also returns the cluster's start-up time."""
    from pipelines.executors import make_executor
    from pipelines.run import RunPaths, claim_run_dir
    from pipelines.stages import stage_featurize, stage_index, stage_score
    from stores import StoreLock

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(trained / "checkpoints", root / "checkpoints")  # same model; the executor is not
    shutil.copy2(trained / "run.json", root / "run.json")  # part of the feature fingerprint
    paths, driver = RunPaths(root), {"driver": os.getpid()}
    n, m = cfg.data.train_size, cfg.data.query_size
    with StoreLock(root):
        claim_run_dir(cfg, root, overwrite=False)
        t0 = time.perf_counter()
        executor = make_executor("dask", None, cfg.executor.workers)  # a LocalCluster
        startup = time.perf_counter() - t0
        try:
            workers = sorted(executor.client.run(os.getpid).values())
            pids = {**driver, **{f"worker {i}": pid for i, pid in enumerate(workers)}}
            rows = [stage_row("featurize", lambda: stage_featurize(cfg, paths, executor=executor), pids, n + m)]
        finally:
            executor.close()
        rows += [stage_row("index", lambda: stage_index(cfg, paths), driver, n),
                 stage_row("score", lambda: stage_score(cfg, paths), driver, n * m)]
    return rows, startup


def _equal_chunked(a: Path, b: Path, rows: int = 1024) -> bool:
    """``np.array_equal`` of two large .npy files, ``rows`` rows at a time (memory-mapped)."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    return x.shape == y.shape and x.dtype == y.dtype and all(
        np.array_equal(x[lo: lo + rows], y[lo: lo + rows]) for lo in range(0, len(x), rows))


def compare_runs(a: Path, b: Path) -> dict[str, bool]:
    """Whether the stored features (ids, features, Q), dense scores and top-k of two runs are equal."""
    from stores import FeatureStore

    same = {}
    for split in ("train", "query"):
        sa, sb = FeatureStore.open(a / f"features-{split}"), FeatureStore.open(b / f"features-{split}")
        same[f"features-{split}"] = len(sa) == len(sb) and all(
            np.array_equal(x.ids, y.ids) and np.array_equal(x.feats, y.feats) and np.array_equal(x.q, y.q)
            for x, y in zip(sa.iter_blocks(), sb.iter_blocks()))
    same["scores.npy"] = _equal_chunked(a / "scores" / "scores.npy", b / "scores" / "scores.npy")
    with np.load(a / "scores" / "topk.npz") as za, np.load(b / "scores" / "topk.npz") as zb:
        same["topk.npz"] = za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)
    return same


def real_ivf_recall(cfg: Any, root: Path, nprobes: list[int]) -> dict[str, Any]:
    """Recall@10 of an IVF index (library defaults) on the run's real TRAK vectors, against the
    exact top-10 proponents in ``scores/topk.npz``: a check on the synthetic store's realism."""
    from pipelines.run import RunPaths
    from pipelines.stages import load_scorer
    from stores import FeatureStore, build_index
    from tda.core.features import concat_blocks

    paths = RunPaths(root)
    scorer = load_scorer(cfg, paths)
    train, query = FeatureStore.open(paths.store("train")), FeatureStore.open(paths.store("query"))
    ivf = build_index(train, scorer, "ivf")
    qv = scorer.transform_query(concat_blocks(list(query.iter_blocks())))  # (m, D)
    with np.load(paths.scores / "topk.npz") as z:
        exact = z["proponent_ids"][:, :10]
    k, found = exact.shape[1], {}
    for p in nprobes:
        ivf.index.nprobe = min(p, ivf.meta["nlist"])
        found[p] = recall(ivf.search(qv, k)[1], exact, k)
    return {"nlist": ivf.meta["nlist"], "k": k, "recall": found}


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    local_cfg, dask_cfg = pipeline_config(args, "local"), pipeline_config(args, "dask")
    c = local_cfg
    print(f"\n== Pipeline: {c.data.name} {c.data.train_size:,} train x {c.data.query_size:,} queries, MLP "
          f"784-{'-'.join(map(str, c.model.hidden))}-10, {c.train.models} model, k={c.featurize.k}, "
          f"{c.score.scorer}, {c.index.kind} index; load {load_avg()}", flush=True)
    out = Path(args.out)
    local, remote = out / "pipeline-local", out / "pipeline-dask"
    local_rows = run_local(local_cfg, local)
    print(f"\n-- dask LocalCluster, {args.workers} workers x 1 thread; load {load_avg()}", flush=True)
    dask_rows, startup = run_dask(dask_cfg, remote, local)
    same = compare_runs(local, remote)
    real = real_ivf_recall(local_cfg, local, args.nprobe)
    scores_bytes = (local / "scores" / "scores.npy").stat().st_size
    result = {"config": c.to_dict(), "local": local_rows, "dask": dask_rows, "dask_startup_s": startup,
              "identical": same, "scores_bytes": scores_bytes,
              "real_ivf": real}
    print_pipeline(result, args)
    if not args.keep:
        for root in (local, remote):
            (root / "scores" / "scores.npy").unlink()
    return result


def _rate(x: float, unit: str) -> str:
    return f"{x:,.0f} {unit}" if x < 1e6 else f"{x:.3g} {unit}"


def _mem(peak: dict[str, int] | None) -> str:
    if not peak:
        return "-"
    return f"{peak['VmHWM'] / GB:.2f} ({peak['RssAnon'] / GB:.2f} + {peak['RssFile'] / GB:.2f})"


def print_pipeline(r: dict[str, Any], args: argparse.Namespace) -> None:
    c = r["config"]
    n, m = c["data"]["train_size"], c["data"]["query_size"]
    units = {"train": "ex/s", "featurize": "ex/s", "index": "ex/s", "score": "pairs/s"}
    work = {"train": f"{n:,} x {c['train']['epochs']} epochs", "featurize": f"{n + m:,} examples",
            "index": f"{n:,} train vectors", "score": f"{n:,} x {m:,} pairs"}
    local, remote = {x["stage"]: x for x in r["local"]}, {x["stage"]: x for x in r["dask"]}
    print(f"\nPipeline, {n:,} train x {m:,} queries, k={c['featurize']['k']}: local ({args.threads} threads) "
          f"vs dask LocalCluster ({args.workers} workers x 1 thread); ratios against local (same run)")
    print(f"{'stage':<10} {'work':<22} {'local s':>8} {'local rate':>16} {'dask s':>8} {'dask rate':>16} "
          f"{'dask/local speed':>17}")
    for stage in ("train", "featurize", "index", "score"):
        a, b = local[stage], remote.get(stage)
        cells = [f"{a['seconds']:.1f}", _rate(a["rate"], units[stage]), "reused", "-", "-"]
        if b:
            cells[2:] = [f"{b['seconds']:.1f}", _rate(b["rate"], units[stage]), f"{a['seconds'] / b['seconds']:.2f}x"]
        print(f"{stage:<10} {work[stage]:<22} {cells[0]:>8} {cells[1]:>16} {cells[2]:>8} {cells[3]:>16} {cells[4]:>17}")
    print(f"dask LocalCluster start-up: {r['dask_startup_s']:.1f} s (not in the featurize time)")
    workers = sorted({name for x in r["dask"] for name in x["memory"] if name.startswith("worker")})
    print("\npeak RSS per process, GB: high-water mark (sampled peak anonymous + file-backed: shared libraries "
          "and memory-mapped files, reclaimable)")
    print(f"{'stage':<10} {'local driver':>22} {'dask driver':>22} " + " ".join(f"{w:>22}" for w in workers))
    for stage in ("train", "featurize", "index", "score"):
        a, b = local[stage]["memory"], remote[stage]["memory"] if stage in remote else {}
        print(f"{stage:<10} {_mem(a['driver']):>22} {_mem(b.get('driver')):>22} "
              + " ".join(f"{_mem(b.get(w)):>22}" for w in workers))
    anon = max(local["score"]["memory"]["driver"]["RssAnon"], remote["score"]["memory"]["driver"]["RssAnon"])
    print(f"\nscores.npy ({m:,} x {n:,} float32) on disk: {r['scores_bytes'] / GB:.2f} GB; peak anonymous memory "
          f"of the score stage: {anon / GB:.2f} GB (the matrix is streamed to a memory-mapped file)")
    real = r["real_ivf"]
    print(f"IVF (nlist {real['nlist']}) on this run's real TRAK vectors and queries, recall@{real['k']} of the exact "
          "proponents: " + ", ".join(f"nprobe {p}: {v:.3f}" for p, v in real["recall"].items()))
    print("dask run identical to local run (np.array_equal): "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["identical"].items()))


# ------------------------------------------------------------------ command line
QUICK = {"n_vectors": 20_000, "dim": 64, "queries": 200, "singles_flat": 20, "singles_ivf": 50,
         "train_size": 2000, "query_size": 300, "k": 64, "epochs": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("faiss", "pipeline", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="small sizes (under a minute): a smoke test, not figures")
    p.add_argument("--out", default=str(Path.home() / ".cache" / "tda" / "scale"),
                   help="work folder (synthetic store, indexes, run folders); default ~/.cache/tda/scale")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder of the MNIST idx files")
    p.add_argument("--threads", type=int, default=2, help="FAISS / torch threads in the driver")
    p.add_argument("--keep", action="store_true", help="keep index files and scores.npy (GBs) after the run")
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    f = p.add_argument_group("faiss")
    f.add_argument("--n-vectors", type=int, default=1_000_000)
    f.add_argument("--dim", type=int, default=512)
    f.add_argument("--queries", type=int, default=1000, help="queries in the batch (and for recall)")
    f.add_argument("--singles-flat", type=int, default=50, help="one-query searches timed on the exact index")
    f.add_argument("--singles-ivf", type=int, default=500, help="one-query searches timed per nprobe")
    f.add_argument("--nlist", type=int, default=None, help="IVF cells (default: the library's 4 sqrt(n))")
    f.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="16 is the library default")
    f.add_argument("--block-rows", type=int, default=65536)
    f.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("pipeline")
    g.add_argument("--config", default=str(CONFIG))
    g.add_argument("--train-size", type=int, default=None, help="default: the config's (60,000)")
    g.add_argument("--query-size", type=int, default=None, help="default: the config's (10,000)")
    g.add_argument("--k", type=int, default=None, help="projection dimension (default: the config's, 512)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--workers", type=int, default=2, help="dask LocalCluster worker processes")
    args = p.parse_args(argv)
    if args.quick:  # quick sizes replace defaults, not values given on the command line
        defaults = p.parse_args([])
        for key, value in {**QUICK, "out": defaults.out + "-quick"}.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    return args


def run_part(argv: list[str], part: str) -> dict[str, Any]:
    """Run one part in a fresh process (so its peak memory is its own) and return its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        subprocess.run([sys.executable, __file__, *argv, "--part", part, "--json", str(out), "--child"], check=True)
        return json.loads(out.read_text())[part]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started, load_start = time.time(), load_avg()
    results: dict[str, Any] = {"load_start": load_start, "cpus": os.cpu_count()}
    for part, run in (("faiss", run_faiss), ("pipeline", run_pipeline)):
        if args.part == "all":
            results[part] = run_part(argv, part)
        elif args.part == part:
            results[part] = run(args)
    results["seconds"] = time.time() - started
    results["load_end"] = load_avg()
    if not args.child:
        print(f"\ntotal {results['seconds'] / 60:.1f} min on {os.cpu_count()} CPUs; load average (1/5/15 min) "
              f"{load_start} at start, {results['load_end']} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
