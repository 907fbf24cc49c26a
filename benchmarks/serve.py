"""Loopback load test of ``tda serve``: latency of top-k answers for stored query ids.

A synthetic store of ``n`` training vectors of dimension ``D`` (low-rank Gaussian plus noise,
generated block by block with a seed) is indexed through :func:`stores.build_index` with the
Grad-Dot scorer (``T_train`` = the features) and the index ``--kind`` (flat, ivf, hnsw: whatever
:mod:`stores.index` offers); ``--queries`` stored queries are transformed once at start-up, as
``tda serve`` does. A server process (uvicorn, the app of :mod:`pipelines.query.serve`) listens on a
free loopback port; this process sends ``--requests`` ``GET /query/{id}?k=K`` requests for random
stored ids, first one by one, then from ``--concurrency`` keep-alive clients at once, and prints
p50 / p95 / p99 latency and requests per second of each.

    python benchmarks/serve.py --n 1000000 --dim 512 --kind hnsw      # the goal: p50 <= 20 ms
    python benchmarks/serve.py --n 20000 --kind flat --requests 200     # a quick look

Building HNSW over 1M x 512 takes minutes on two cores; the build time is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stores import build_index  # noqa: E402
from tda.core.features import FeatureBlock  # noqa: E402
from tda.scorers import GradDotScorer  # noqa: E402

RANK = 64  # the synthetic vectors' low-rank part (gradients are far from isotropic)


class SyntheticStore:
    """A feature source of ``n`` seeded synthetic vectors (one checkpoint), made block by block."""

    checkpoints = [0]

    def __init__(self, n: int, dim: int, seed: int = 0) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        self.basis = np.random.default_rng(seed).standard_normal((RANK, dim)).astype(np.float32) / np.sqrt(RANK)

    def __len__(self) -> int:
        return self.n

    @property
    def k(self) -> int:
        return self.dim

    def rows(self, lo: int, hi: int, salt: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, salt, lo])
        z = rng.standard_normal((hi - lo, RANK), dtype=np.float32)
        return z @ self.basis + 0.3 * rng.standard_normal((hi - lo, self.dim), dtype=np.float32)

    def iter_blocks(self, block_rows: int = 4096):
        for lo in range(0, self.n, block_rows):
            hi = min(lo + block_rows, self.n)
            feats = self.rows(lo, hi)[None]  # (1, b, D)
            yield FeatureBlock(ids=np.arange(lo, hi, dtype=np.int64), feats=feats, q=np.ones((1, hi - lo), np.float32))


class Labels:
    """``id -> label`` of the synthetic set (id mod 10) without a dict of a million entries."""

    def get(self, i: int, default: object = None) -> int:
        return int(i) % 10


def serve(args: argparse.Namespace) -> None:
    """The server process: build the index, load the service, run uvicorn."""
    import uvicorn

    from pipelines.query.lean import LoadedRun
    from pipelines.query.serve import create_app
    from pipelines.query.state import Service

    store, scorer = SyntheticStore(args.n, args.dim, args.seed), GradDotScorer()
    t0 = time.time()
    index = build_index(store, scorer, args.kind, block_rows=8192)
    build_s = time.time() - t0
    vectors = store.rows(0, args.queries, salt=1)  # (queries, D): T_query of the stored queries, cached
    run = LoadedRun(SimpleNamespace(score=SimpleNamespace(scorer="graddot")), None, scorer, index,
                    {"train": Labels(), "query": Labels()})
    service = Service(run, np.ascontiguousarray(vectors), {i: i for i in range(args.queries)}, "synthetic")
    service.load_s, service.threads = build_s, args.threads  # threads: after the build, which uses every core
    print(json.dumps({"built": args.kind, "n": args.n, "dim": args.dim, "build_s": round(build_s, 1),
                      "meta": {k: v for k, v in index.meta.items() if k in ("kind", "nlist", "nprobe", "hnsw_m",
                                                                          "ef_construction", "ef_search")}}),
          flush=True)
    uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="warning")


def _get(conn: http.client.HTTPConnection, path: str) -> float:
    t = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status} {body[:200]!r}")
    return time.perf_counter() - t


def load_test(port: int, ids: np.ndarray, k: int, clients: int) -> dict[str, float]:
    """Send one ``GET /query/{id}`` per id from ``clients`` keep-alive connections; latency stats."""
    parts = np.array_split(ids, clients)
    times: list[list[float]] = [[] for _ in parts]

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in parts[c]:
            times[c].append(_get(conn, f"/query/{int(i)}?k={k}"))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(t) for t in times]) * 1000
    return {"clients": clients, "requests": len(lat), "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)), "req_s": len(lat) / wall}


def _wait(port: int, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server process exited")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no server after {timeout:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="training vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension D (default 512)")
    p.add_argument("--kind", default="hnsw", help="index kind: flat, ivf, hnsw (default hnsw)")
    p.add_argument("--queries", type=int, default=1000, help="stored queries (default 1000)")
    p.add_argument("--requests", type=int, default=1000, help="requests per phase (default 1000)")
    p.add_argument("--concurrency", type=int, default=4, help="clients of the concurrent phase (default 4)")
    p.add_argument("-k", type=int, default=10, help="proponents and opponents per answer (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads per search in the server (default 1)")
    p.add_argument("--build-timeout", type=float, default=3600, help="seconds to wait for the build (default 3600)")
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.server:
        serve(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a for a in sys.argv[1:] if not a.startswith("--port")]
    proc = subprocess.Popen([sys.executable, __file__, *argv, "--server", "--port", str(port)])
    try:
        health = _wait(port, proc, args.build_timeout)
        print(f"server: {health['index']} index over {health['n_train']} x {health['dim']}, built in "
              f"{health['load_s']:.1f}s; {health['n_query']} stored queries", flush=True)
        ids = np.random.default_rng(args.seed).integers(0, args.queries, args.requests)
        load_test(port, ids[: min(20, len(ids))], args.k, 1)  # warm-up
        for clients in (1, args.concurrency):
            r = load_test(port, ids, args.k, clients)
            print(f"  {r['clients']} client(s), {r['requests']} requests: p50 {r['p50_ms']:.2f} ms, p95 "
                  f"{r['p95_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, {r['req_s']:.0f} requests/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
