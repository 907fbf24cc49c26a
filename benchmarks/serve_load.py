"""Bounded loopback load test of ``tda serve`` on a real run: stored ids and new inputs at once.

Makes (or reuses) a run of ``--config`` (default ``configs/tiny.yaml``), starts ``tda serve RUN``
as its own process on a free loopback port, and sends ``--requests`` requests from
``--concurrency`` keep-alive clients: ``GET /query/{id}`` for random stored query ids and, for a
``--new-share`` of them, ``POST /query/input`` with a stored query's row sent as a new input (the
model featurizes it on the fly). It prints p50 / p99 latency and requests per second of each kind,
the share of non-200 answers, and the server's resident memory (RSS) before the load, after it, and
after a second identical round (growth between the rounds means memory that is never released).

    python benchmarks/serve_load.py                        # tiny run: 2,000 requests, 16 at a time
    python benchmarks/serve_load.py --config configs/mnist_trak.yaml --out runs/mnist-trak
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None) -> tuple[int, float]:
    t0 = time.perf_counter()
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    resp.read()
    return resp.status, time.perf_counter() - t0


def load_round(port: int, plan: list[tuple[str, str, dict | None]], clients: int) -> dict[str, list]:
    """Send ``plan`` from ``clients`` threads; ``{kind: [(status, seconds), ...]}``."""
    out: dict[str, list] = {"stored": [], "new": []}
    lock, queue = threading.Lock(), list(plan)

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not queue:
                    break
                method, path, body = queue.pop()
            status, spent = _request(conn, method, path, body)
            with lock:
                out["new" if body is not None else "stored"].append((status, spent))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summary(name: str, results: list, wall: float) -> str:
    if not results:
        return f"  {name}: none"
    ms = np.array([s for _, s in results]) * 1000
    bad = sum(1 for st, _ in results if st != 200)
    return (f"  {name:<7} {len(results):>5} requests  p50 {np.percentile(ms, 50):7.1f} ms  p99 {np.percentile(ms, 99):7.1f} ms"
            f"  {len(results) / wall:7.1f} req/s  non-200 {bad}")


def make_plan(run: Path, n: int, new_share: float, seed: int) -> list[tuple[str, str, dict | None]]:
    from pipelines.layout import RunPaths
    from pipelines.run import datasets_for
    from pipelines.run_folder import recorded_config

    paths = RunPaths(run)
    query = datasets_for(recorded_config(paths), paths)["query"]
    with np.load(run / "scores" / "topk.npz") as z:
        ids = z["query_ids"].tolist()
    rows = {int(i): {c: (v.tolist() if hasattr(v, "tolist") else v) for c, v in r.items() if c != "id"}
            for i, r in zip(np.asarray(query["id"]).tolist(), query)}
    rng = random.Random(seed)
    plan = []
    for _ in range(n):
        qid = rng.choice(ids)
        if rng.random() < new_share:
            plan.append(("POST", "/query/input", {"rows": [rows[qid]], "k": 10}))
        else:
            plan.append(("GET", f"/query/{qid}?k=10", None))
    return plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--out", default=str(ROOT / "runs" / "serve-load"))
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-share", type=float, default=0.1, help="share of requests that are new inputs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    run = Path(args.out).resolve()
    subprocess.run([sys.executable, "-m", "pipelines.cli.main", "run", args.config, "--out", str(run), "--quiet"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    plan = make_plan(run, args.requests, args.new_share, args.seed)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli.main", "serve", str(run), "--port", str(port),
                             "--trust-code"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                if _request(conn, "GET", "/health", None)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"tda serve did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.2)
        load_round(port, plan[:32], 4)  # warm-up: the model loads on the first new input
        rss = [_rss_mb(proc.pid)]
        for round_ in (1, 2):
            t0 = time.perf_counter()
            out = load_round(port, plan, args.concurrency)
            wall = time.perf_counter() - t0
            rss.append(_rss_mb(proc.pid))
            print(f"round {round_}: {args.requests} requests, {args.concurrency} clients, {wall:.1f} s")
            print(summary("stored", out["stored"], wall))
            print(summary("new", out["new"], wall))
        print(f"server RSS: {rss[0]:.0f} MB before, {rss[1]:.0f} MB after round 1, {rss[2]:.0f} MB after round 2 "
              f"(growth between rounds: {rss[2] - rss[1]:+.0f} MB)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
