"""The batched tensorsketch path against the per-layer one, A/B in one process (issue 26).

On the models of ``benchmarks/featurize_lm.py`` (the GPT-2 char LM, the tiny BERT classifier,
rows padded per batch), captures ``--n`` rows in batches of ``--batch`` once, then times, in
interleaved rounds (a slow moment of a shared machine hits every variant alike; the best round
of each is reported): ``floor`` (one plain batched forward + backward), ``capture`` (the
captures' forward + backward), and the projection of the captured batches by the per-layer
path (``batched=False``) and by the batched one. Also prints the profiler's operator calls of
each projection and checks that both give the same features (allclose).

    python benchmarks/tensorsketch_batched.py --model bert --k 1024
    python benchmarks/tensorsketch_batched.py --model char --k 4096 --rounds 15
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import featurize_lm  # noqa: E402

from tda.featurizers.factored import FactoredFeaturizer  # noqa: E402
from tda.projections.tensorsketch import TensorSketchProjector  # noqa: E402


def batches(model_name: str, n: int, batch: int):
    """Model, task and the data in batches (BERT's padded to each batch's longest row)."""
    if model_name == "bert":
        model, task, data, _ = featurize_lm.bert_batches(n)
    else:
        model, task, data, _ = featurize_lm.lm_batches(model_name, n)
    out = []
    for lo in range(0, n, batch):
        rows = {k: v[lo: lo + batch] for k, v in data.items()}
        if model_name == "bert":
            width = int(rows["attention_mask"].sum(1).max())
            rows = {k: v[:, :width] if v.ndim == 2 else v for k, v in rows.items()}
        out.append(rows)
    return model, task, out


def op_calls(fn) -> Counter:
    """Operator calls of one run of ``fn``."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return Counter(e.name for e in prof.events())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert", choices=("bert", "char"))
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: this process's CPU time (with --threads 1 the least disturbed by other processes)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, task, data = batches(a.model, a.n, a.batch)
    fz = FactoredFeaturizer(model, task, projection="tensorsketch", k=a.k)
    caps = [next(fz.captures(b)) for b in data]
    per_layer = TensorSketchProjector(fz.layers, k=a.k, batched=False)
    batched = TensorSketchProjector(fz.layers, k=a.k, batched=True)

    def floor():
        for b in data:
            model.zero_grad(set_to_none=True)
            task.output(model, b).sum().backward()

    def capture():
        for b in data:
            next(fz.captures(b))

    def featurize(projector):  # what tda's featurization does per batch (captures, projection, checks, copy out)
        def run():
            fz.projector = projector
            for b in data:
                fz.featurize_batch(b, list(range(len(b["input_ids"]))), 0)
        return run

    featurize(batched)()  # the first batch's check of the captures against autograd, untimed
    runs = {"floor": floor, "capture": capture,
            "per-layer": lambda: [per_layer.project(c, 0) for c in caps],
            "batched": lambda: [batched.project(c, 0) for c in caps],
            "featurize per-layer": featurize(per_layer), "featurize batched": featurize(batched)}
    err = 0.0
    for c in caps:  # equal features, up to rounding
        old, new = per_layer.project(c, 0), batched.project(c, 0)
        err = max(err, float((old - new).norm() / old.norm()))
    assert err < 1e-5, err
    best = dict.fromkeys(runs, float("inf"))
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    for _ in range(a.rounds):
        for name, run in runs.items():
            start = clock()
            run()
            best[name] = min(best[name], clock() - start)
    load = os.getloadavg()
    print(f"{a.model} k={a.k}: {a.n} rows in batches of {a.batch}, {a.threads} threads, {a.clock} time, best of "
          f"{a.rounds} interleaved rounds, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; max relative difference {err:.1e}")
    for name, s in best.items():
        print(f"  {name:20s} {s * 1e3:8.1f} ms")
    print(f"  projection batched / per-layer: {best['batched'] / best['per-layer']:.2f}; "
          f"featurization x floor (floor / featurize): per-layer {best['floor'] / best['featurize per-layer']:.2f}, "
          f"batched {best['floor'] / best['featurize batched']:.2f}")
    for name in ("per-layer", "batched"):
        calls = op_calls(runs[name])
        top = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in calls.most_common(8))
        print(f"  {name} op calls: {sum(calls.values())} ({top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
