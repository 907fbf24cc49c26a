"""Index kinds against exact search: recall@k and queries/s of pruned, IVF and HNSW, and the whitening.

Every approximate index is measured against the exact (flat) index in the same run, on the same
queries and threads: recall@k of proponents (largest scores) and opponents (most negative, the
negated query), queries per second of one batched search of both (``2 x --queries`` searches), and
the ratio of that to exact flat search.

Data sets (vectors cached under ``~/.cache/tda/index/``, so reruns only search):

- ``mnist``: real TRAK vectors of the 60,000 MNIST training images (``configs/mnist_scale.yaml``:
  MLP 784-128-10, one model, k = 512, TRAK with the automatic ridge) and 1,000 test images as
  queries. The run is made once with ``tda run`` (train + featurize, about 5 minutes on 2 cores)
  into ``~/.cache/tda/index/mnist-run``. Measured in two spaces: ``whitened`` (what tda indexes:
  ``L^-1 phi_i Q_i`` against ``L^-1 phi(z)``, ``K = L L^T``) and ``plain`` (what older versions
  indexed: ``phi_i Q_i`` against ``K^-1 phi(z)``); the scores are identical, the geometry not.
- ``synthetic``: ``--n`` x ``--dim`` (default 1,000,000 x 512) TRAK vectors of synthetic
  features with structure: 1,000 clusters of Zipf-distributed sizes, a decaying spectrum
  (``j^-0.8``), log-normal per-example norms, and per-example ``Q = 1 - p`` drawn from
  Beta(0.3, 3) (most training examples are fitted well, so most train vectors are short). A
  :class:`tda.TRAKScorer` is fitted on them and the vectors are its transforms.

    python benchmarks/index.py                              # both data sets
    python benchmarks/index.py --part synthetic --n 200000  # a smaller store
    python benchmarks/index.py --part mnist --nprobe 8 16 32 --ef 32 64 128
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path.home() / ".cache" / "tda" / "index"

from stores.index import FaissIndex, default_nlist, default_nprobe, recall_at_k  # noqa: E402
from tda.core.features import ArrayFeatures, FeatureBlock  # noqa: E402
from tda.scorers import TRAKScorer  # noqa: E402


# ------------------------------------------------------------------ vectors
def _blocks(x: np.ndarray, rows: int = 65536):
    for lo in range(0, len(x), rows):
        yield np.arange(lo, min(lo + rows, len(x)), dtype=np.int64), x[lo:lo + rows]


def _transform(scorer: TRAKScorer, phi: np.ndarray, q: np.ndarray, side: str, rows: int = 16384) -> np.ndarray:
    """A TRAK transform of (n, k) features with weights q (n,), block by block, float32."""
    out = np.empty(phi.shape, np.float32)
    fn = scorer.transform_train if side == "train" else scorer.transform_query
    for lo in range(0, len(phi), rows):
        sl = slice(lo, lo + rows)
        out[sl] = fn(FeatureBlock(np.arange(len(phi))[sl], phi[None, sl], q[None, sl]))
    return out


def _plain(scorer: TRAKScorer, train_w: np.ndarray, query_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pre-whitening space from the whitened one: ``L T_train`` and ``L^-T T_query``."""
    chol = scorer.chol[0]
    train = (train_w.astype(np.float64) @ chol.T).astype(np.float32)  # L (L^-1 phi w) = phi w
    query = np.linalg.solve(chol.T, query_w.T.astype(np.float64)).T.astype(np.float32)  # K^-1 phi
    return train, query


def mnist_vectors(nq: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Whitened and plain TRAK vectors of the MNIST run (made with ``tda run`` when missing)."""
    from stores import FeatureStore

    cache = CACHE / "mnist-trak.npz"
    if not cache.is_file():
        run = CACHE / "mnist-run"
        for stage in ("train", "featurize"):  # each reuses what is already there
            subprocess.run(["tda", "run", str(ROOT / "configs" / "mnist_scale.yaml"), "--set", "data.query_size=1000",
                            "--out", str(run), "--only", stage, "--quiet"], check=True, cwd=ROOT)
        train, query = FeatureStore.open(run / "features-train"), FeatureStore.open(run / "features-query")
        scorer = TRAKScorer().fit(train)
        tw = np.concatenate([scorer.transform_train(b) for b in train.iter_blocks(8192)])
        qw = np.concatenate([scorer.transform_query(b) for b in query.iter_blocks(8192)])
        tp, qp = _plain(scorer, tw, qw)
        np.savez(cache, tw=tw, qw=qw, tp=tp, qp=qp)
    with np.load(cache) as z:
        return {"whitened": (z["tw"], z["qw"][:nq]), "plain": (z["tp"], z["qp"][:nq])}


def synthetic_features(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) clustered features with a decaying spectrum and log-normal norms; (n,) Q."""
    rng = np.random.default_rng(seed)
    spec = (np.arange(1, dim + 1) ** -0.8).astype(np.float32)
    centres = rng.standard_normal((1000, dim)).astype(np.float32) * spec * 2
    sizes = 1.0 / np.arange(1, 1001)
    label = rng.choice(1000, n, p=sizes / sizes.sum())
    phi = np.empty((n, dim), np.float32)
    for lo in range(0, n, 65536):
        sl = slice(lo, lo + 65536)
        noise = rng.standard_normal((len(label[sl]), dim), dtype=np.float32) * spec * 0.7
        scale = np.exp(0.5 * rng.standard_normal(len(label[sl]))).astype(np.float32)
        phi[sl] = (centres[label[sl]] + noise) * scale[:, None]
    return phi, rng.beta(0.3, 3.0, n).astype(np.float32)


def synthetic_vectors(n: int, dim: int, nq: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Whitened TRAK vectors of the synthetic store (``.npy`` cached, memory-mapped)."""
    tpath, qpath = CACHE / f"synth-n{n}-d{dim}-train.npy", CACHE / f"synth-n{n}-d{dim}-query.npy"
    if not (tpath.is_file() and qpath.is_file()):
        phi, q = synthetic_features(n, dim, seed=0)
        scorer = TRAKScorer().fit(ArrayFeatures(FeatureBlock(np.arange(n), phi[None], q[None]), [0]))
        np.save(tpath, _transform(scorer, phi, q, "train"))
        del phi
        qphi, _ = synthetic_features(4096, dim, seed=1)  # fresh examples of the same process
        np.save(qpath, _transform(scorer, qphi, np.ones(len(qphi), np.float32), "query"))
    return {"whitened": (np.load(tpath, mmap_mode="r"), np.load(qpath)[:nq])}


# ------------------------------------------------------------------ measuring
def _timed_search(index: FaissIndex, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Best-of-``repeats`` wall time of one batched search, and its answers."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        scores, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return best, scores, ids


def measure(data: str, space: str, train: np.ndarray, queries: np.ndarray, args) -> list[dict]:
    """Exact flat, then IVF and HNSW at each setting, on one set of vectors."""
    both = np.ascontiguousarray(np.concatenate([queries, -queries]), dtype=np.float32)
    m, dim, n = len(queries), train.shape[1], len(train)
    t = time.perf_counter()
    flat = FaissIndex.build(_blocks(train), dim, "flat")
    build = time.perf_counter() - t
    t_flat, e_s, e_i = _timed_search(flat, both, args.k, args.repeats)
    del flat
    rows = [dict(data=data, space=space, kind="flat", setting="exact", build=build, qps=2 * m / t_flat, speedup=1.0,
                 pro=1.0, opp=1.0)]
    print(f"  {data}/{space} flat: build {build:.1f}s, {2 * m / t_flat:.0f} q/s", flush=True)

    def record(index: FaissIndex, kind: str, setting: str, build: float) -> None:
        sec, s, i = _timed_search(index, both, args.k, args.repeats)
        per = recall_at_k(i, s, e_i, e_s)
        rows.append(dict(data=data, space=space, kind=kind, setting=setting, build=build, qps=2 * m / sec,
                         speedup=t_flat / sec, pro=per[:m].mean(), opp=per[m:].mean()))
        print(f"  {data}/{space} {kind} {setting}: recall {per[:m].mean():.3f}/{per[m:].mean():.3f}, "
              f"{2 * m / sec:.0f} q/s ({t_flat / sec:.1f}x)", flush=True)

    if "pruned" in args.kinds:
        t = time.perf_counter()
        pruned = FaissIndex.build(_blocks(train), dim, "pruned")
        record(pruned, "pruned", "exact", time.perf_counter() - t)
        del pruned
    if "ivf" in args.kinds:
        nlist = default_nlist(n)
        rng = np.random.default_rng(0)
        sample = train[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
        t = time.perf_counter()
        ivf = FaissIndex.build(_blocks(train), dim, "ivf", nlist=nlist, n_hint=n, sample=sample)
        build = time.perf_counter() - t
        for p in args.nprobe or sorted({default_nprobe(nlist) // 2, default_nprobe(nlist), 2 * default_nprobe(nlist)}):
            mark = " (default)" if p == default_nprobe(nlist) else ""
            record(ivf.set_search(nprobe=p), "ivf", f"nlist {nlist}, nprobe {p}{mark}", build)
            build = float("nan")
        del ivf
    if "hnsw" in args.kinds:
        t = time.perf_counter()
        hnsw = FaissIndex.build(_blocks(train), dim, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
        build = time.perf_counter() - t
        for ef in args.ef:
            record(hnsw.set_search(ef_search=ef), "hnsw", f"M {args.hnsw_m}, efC {args.ef_construction}, ef {ef}", build)
            build = float("nan")
    return rows


def print_table(rows: list[dict], k: int) -> None:
    print(f"\n| data | space | index | build, s | queries/s | vs exact | recall@{k} proponents | recall@{k} opponents |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        build = "" if r["build"] != r["build"] else f"{r['build']:.1f}"
        print(f"| {r['data']} | {r['space']} | {r['kind']}, {r['setting']} | {build} | {r['qps']:,.0f} | "
              f"{r['speedup']:.1f}x | {r['pro']:.3f} | {r['opp']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("mnist", "synthetic", "all"), default="all")
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic store rows")
    ap.add_argument("--dim", type=int, default=512, help="synthetic store width")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=["pruned", "ivf", "hnsw"], choices=("pruned", "ivf", "hnsw"))
    ap.add_argument("--nprobe", type=int, nargs="*", help="IVF settings (default: half, 1x, 2x the default)")
    ap.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128], help="HNSW ef_search settings")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--no-plain", action="store_true", help="MNIST: skip the unwhitened space")
    ap.add_argument("--repeats", type=int, default=2, help="timed searches per setting (best kept)")
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    args = ap.parse_args(argv)
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[dict] = []
    if args.part in ("mnist", "all"):
        for space, (train, query) in mnist_vectors(args.queries).items():
            if space == "plain" and args.no_plain:
                continue
            rows += measure("MNIST TRAK 60k x 512", space, train, query, args)
    if args.part in ("synthetic", "all"):
        t = time.perf_counter()
        data = synthetic_vectors(args.n, args.dim, args.queries)
        print(f"  synthetic vectors ready in {time.perf_counter() - t:.0f}s", flush=True)
        name = f"synthetic {args.n:,} x {args.dim}"
        rows += measure(name, "whitened", np.ascontiguousarray(data["whitened"][0]), data["whitened"][1], args)
    print_table(rows, args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
