"""Featurization throughput and peak memory: tda against traker, same model, data, k and batches.

MLP 784-512-512-10 (669,706 parameters) on MNIST training images; per-example gradients of the
classification margin projected to k dimensions with a Rademacher matrix, on the CPU. Each
(library, k) pair runs in its own fresh process so peak resident memory is per process; the
parent prints examples/s, peak RSS (and its growth over the process's RSS after loading data
and model), and the tda/traker ratios.

The timed region covers everything a user waits for once model and data are loaded: building
the featurizer (traker generates its first projection block in its constructor), gradients,
projection, Q, and handing back / storing the features. No warm-up batch is excluded, so tda
pays for generating its projection blocks inside the timed region.

    python benchmarks/featurize.py                       # k = 1024 and 4096, 1024 examples, batch 128
    python benchmarks/featurize.py --k 1024 --n 256      # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"


VARIANTS = ("tda", "tda-bf16", "tda-sparse", "tda-factored", "tda-tensorsketch", "traker")


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from tda.data.loading import arrow_columns, load_mnist, mnist_collate
    from tda.models.reference import mlp

    args.k = args.k[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = mnist_collate(arrow_columns(load_mnist(args.data, "train", args.n).with_format("arrow")[:]))
    x, y = data["x"].float(), data["y"].long()
    model = mlp(784, (512, 512), 10).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = sum(p.numel() for p in model.parameters())
    starts = list(range(0, args.n, args.batch))
    base = rss_mb()
    t0 = time.perf_counter()
    if args.worker.startswith("tda"):
        fz = make_featurizer(args.worker, model, args.k)
        batches = ((np.arange(lo, min(lo + args.batch, args.n)), {"x": x[lo: lo + args.batch], "y": y[lo: lo + args.batch]})
                   for lo in starts)
        out = np.empty((args.n, getattr(fz, "k", args.k)), dtype=np.float32)
        for ids, phi, _q in fz.featurize(state, 0, batches):
            out[ids] = phi
        check = float(np.abs(out).mean())
    else:
        from trak import TRAKer

        tmp = tempfile.mkdtemp(prefix="traker-bench-")
        traker = TRAKer(model=model, task="image_classification", train_set_size=args.n, save_dir=tmp,
                        device="cpu", proj_dim=args.k, use_half_precision=False, logging_level=40)
        traker.load_checkpoint(state, model_id=0)
        for lo in starts:
            xb, yb = x[lo: lo + args.batch], y[lo: lo + args.batch]
            traker.featurize(batch=(xb, yb), num_samples=len(yb))
        check = float(np.abs(np.asarray(traker.saver.current_store["grads"][: args.n])).mean())
    seconds = time.perf_counter() - t0
    width = getattr(fz, "k", args.k) if args.worker.startswith("tda") else args.k
    return {"library": args.worker, "k": args.k, "width": width, "n": args.n, "batch": args.batch, "dim": dim,
            "seconds": seconds, "examples_per_s": args.n / seconds, "peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base, "mean_abs_feature": check}


def make_featurizer(variant: str, model, k: int):
    """tda's featurizer of a benchmark variant at projection width (about) k."""
    from tda.featurizers.factored import FactoredFeaturizer
    from tda.featurizers.gradient import Featurizer
    from tda.models.tasks import ClassificationTask

    task = ClassificationTask()
    if variant == "tda-factored":  # three linear layers: k_in = k_out = sqrt(k / 3), width ~ k
        side = max(1, round((k / 3) ** 0.5))
        return FactoredFeaturizer(model, task, k_in=side, k_out=side, seed=0)
    if variant == "tda-sparse":
        return Featurizer(model, task, k=k, seed=0, projection="sparse")
    if variant == "tda-tensorsketch":  # the three linear layers sketched into the same k outputs
        return FactoredFeaturizer(model, task, seed=0, projection="tensorsketch", k=k)
    return Featurizer(model, task, k=k, seed=0, precision="bf16" if variant == "tda-bf16" else "fp32")


def run_child(lib: str, k: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", lib, "--k", str(k), "--n", str(args.n), "--batch", str(args.batch),
           "--threads", str(args.threads), "--data", args.data]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{lib} k={k} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--n", type=int, default=1024, help="training examples featurized per run")
    p.add_argument("--batch", type=int, default=128, help="examples per featurize call (both libraries)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--libs", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="tda (dense fp32), tda-bf16 (dense, precision='bf16'), tda-sparse (SJLT, s=1), "
                        "tda-factored (per-layer k_in = k_out = sqrt(k/3)), tda-tensorsketch (per-layer "
                        "TensorSketch into k), traker (dense, its CPU projector)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for k in args.k:
        for lib in args.libs:
            r = run_child(lib, k, args)
            results.append(r)
            print(f"{lib:>16} k={k:<5} {r['examples_per_s']:8.1f} ex/s  {r['seconds']:7.1f} s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['peak_rss_mb'] - r['base_rss_mb']:.0f} over "
                  f"{r['base_rss_mb']:.0f} MB loaded)", flush=True)
    print(f"\nMLP 784-512-512-10 (d={results[0]['dim']:,}), {args.n} MNIST train examples, batch {args.batch}, "
          f"{args.threads} threads, CPU")
    print(f"{'k':>6} {'tda variant':>16} {'width':>6} {'ex/s':>8} {'traker ex/s':>12} {'speed ratio':>12} "
          f"{'peak MB':>8} {'traker peak MB':>15} {'memory ratio':>13}")
    for k in args.k:
        by = {r["library"]: r for r in results if r["k"] == k}
        b = by.get("traker")
        for name in VARIANTS[:-1]:
            a = by.get(name)
            if a is None or b is None:
                continue
            print(f"{k:>6} {name:>16} {a['width']:>6} {a['examples_per_s']:>8.1f} {b['examples_per_s']:>12.1f} "
                  f"{a['examples_per_s'] / b['examples_per_s']:>11.1f}x {a['peak_rss_mb']:>8.0f} "
                  f"{b['peak_rss_mb']:>15.0f} {a['peak_rss_mb'] / b['peak_rss_mb']:>12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
