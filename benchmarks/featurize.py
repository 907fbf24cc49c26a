"""Featurization throughput and peak memory: tda against traker, bergson and the floor, same model,
data, k and batches.

MLP 784-512-512-10 (669,706 parameters) on MNIST training images; per-example gradients of the
classification margin projected to k dimensions, on the CPU. Each (variant, k) pair runs in its
own fresh process so peak resident memory is per process; the parent prints examples/s, peak RSS
(and its growth over the process's RSS after loading data and model), the coverage (share of the
parameters whose gradient the features sketch) and the ratios to the floor, traker and bergson.

- ``floor``: one plain batched forward + backward of the summed margin per batch (parameter
  ``.grad`` only, no per-example anything): what any per-example method costs at least.
- ``tda*``: tda's featurizers (dense fp32 / bf16, sparse SJLT, factored, tensorsketch).
- ``traker``: MadryLab traker's ``TRAKer`` with its CPU projector (``BasicProjector``).
- ``bergson`` / ``bergson-module``: EleutherAI bergson 2.5.1's ``GradientCollector`` through
  :func:`featurize_lm_peers.bergson_featurizer`, driven by our backward of the same margin;
  ``global`` projection (k dims exactly) / its default ``per_module`` p x p sketch of each layer,
  p = floor(sqrt(k / 3)). Its hooks go on the ``base_model`` of what they are given and assert
  (N, S, I) inputs: the MLP is wrapped as the ``base_model`` of a module that runs it on
  (N, 1, 784) rows (one position per example, so the per-example gradient is exact). Coverage:
  the three ``nn.Linear`` weights (no biases at its default). bergson lives in its own venv:
  these rows run under ``--bergson-python`` (default ``$TDA_BERGSON_PYTHON``, else this
  interpreter) and say "not installed" where it lacks bergson.

The timed region covers everything a user waits for once model and data are loaded: building
the featurizer (traker generates its first projection block in its constructor; bergson's
collector is built), gradients, projection, Q, and handing back / storing the features. No
warm-up batch is excluded, so tda pays for generating its projection blocks inside the timed
region. ``--repeats R`` runs the whole region R times in the process (featurizer rebuilt each
time) and reports the fastest (other processes only ever slow a pass down).

``--check`` compares the first batch's feature inner products, scaled to a JL sketch (tda and
traker by sqrt(d/k): ``TRAKer`` divides its projections by sqrt(d); bergson as is), with those of exact per-example gradients of the
covered parameters (:func:`featurize_lm_peers.check`): the rms of
``(<phi_i, phi_j> - <g_i, g_j>) / (|g_i| |g_j|)`` beside ``sqrt(2/width)``. Double-sided sketches
(``tda-factored``, ``bergson-module``) are noisier than that by design.

    python benchmarks/featurize.py                       # k = 1024 and 4096, 1024 examples, batch 128
    python benchmarks/featurize.py --k 1024 --n 256      # quicker look
    TDA_BERGSON_PYTHON=/tmp/benv/bin/python python benchmarks/featurize.py --k 1024 --n 256 --check
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

TDA = ("tda", "tda-bf16", "tda-sparse", "tda-factored", "tda-tensorsketch")
PEERS = ("traker", "bergson", "bergson-module")
VARIANTS = ("floor",) + TDA + PEERS


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def one_token(mlp):
    """The layers of the ``nn.Sequential`` ``mlp`` as the ``base_model`` (with a ``device``) of a
    module that runs them on (N, 1, I) inputs, as bergson's collector wants (it hooks
    ``base_model``, reads its ``device``, asserts 3-d inputs); (N, I) in, (N, O) out."""
    from torch import nn

    class Base(nn.Sequential):  # bergson's collector asserts an HF-style ``device`` on what it hooks
        @property
        def device(self):
            return next(self.parameters()).device

    class OneToken(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_model = base

        def forward(self, x):
            return self.base_model(x.unsqueeze(1)).squeeze(1)

    return OneToken(Base(*mlp))  # the same layers, so the same parameters


def _spans(n: int, batch: int):
    return [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]


def floor_pass(model, task, x, y, batch: int, info: dict):
    """One batched forward + backward of the summed margin per batch (``.grad`` only)."""
    for lo, hi in _spans(len(y), batch):
        model.zero_grad(set_to_none=True)
        task.output(model, {"x": x[lo:hi], "y": y[lo:hi]}).sum().backward()
    info["width"] = 0
    return None


def tda_pass(variant: str, model, state, k: int, x, y, batch: int, info: dict):
    import numpy as np
    import torch

    fz = make_featurizer(variant, model, k)
    batches = ((np.arange(lo, hi), {"x": x[lo:hi], "y": y[lo:hi]}) for lo, hi in _spans(len(y), batch))
    out = np.empty((len(y), getattr(fz, "k", k)), dtype=np.float32)
    for ids, phi, _q in fz.featurize(state, 0, batches):
        out[ids] = phi
    info.update(width=out.shape[1], names=list(getattr(fz, "names", None) or []), chose=variant)
    return torch.from_numpy(out)


def traker_pass(model, state, k: int, x, y, batch: int, info: dict):
    import numpy as np
    import torch
    from trak import TRAKer

    tmp = tempfile.mkdtemp(prefix="traker-bench-")
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(y), save_dir=tmp,
                    device="cpu", proj_dim=k, use_half_precision=False, logging_level=40)
    traker.load_checkpoint(state, model_id=0)
    for lo, hi in _spans(len(y), batch):
        traker.featurize(batch=(x[lo:hi], y[lo:hi]), num_samples=hi - lo)
    info.update(width=k, chose="TRAKer, BasicProjector")
    return torch.from_numpy(np.array(traker.saver.current_store["grads"][: len(y)], dtype=np.float32))


def bergson_pass(variant: str, wrapped, task, k: int, x, y, batch: int, info: dict):
    import torch

    import featurize_lm_peers as peers

    target = "global" if variant == "bergson" else "per_module"
    one, got, names = peers.bergson_featurizer(wrapped, task, k, target, {"x": x[:batch], "y": y[:batch]})
    feats = torch.cat([one({"x": x[lo:hi], "y": y[lo:hi]}) for lo, hi in _spans(len(y), batch)])
    info.update(width=feats.shape[1], names=names, chose=got["chose"])
    return feats


def missing(variant: str) -> str | None:
    """Why a peer cannot run in this interpreter, or None."""
    if variant not in PEERS:
        return None
    try:
        __import__("trak" if variant == "traker" else "bergson")
    except ImportError as exc:
        return f"not installed in {sys.executable} ({exc})"
    return None


def worker(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    row = {"library": args.worker, "k": args.k, "n": args.n, "batch": args.batch}
    if why := missing(args.worker):
        return {**row, "skipped": why}
    from tda.data.loading import arrow_columns, load_mnist, mnist_collate
    from tda.models.reference import mlp
    from tda.models.tasks import ClassificationTask

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = mnist_collate(arrow_columns(load_mnist(args.data, "train", args.n).with_format("arrow")[:]))
    x, y = data["x"].float(), data["y"].long()
    model, task = mlp(784, (512, 512), 10).eval(), ClassificationTask()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    net = one_token(model) if args.worker.startswith("bergson") else model
    params = dict(net.named_parameters())
    dim = sum(p.numel() for p in params.values())
    info: dict = {"chose": args.worker}
    v, k, b = args.worker, args.k, args.batch
    base = rss_mb()
    seconds = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        if v == "floor":
            feats = floor_pass(model, task, x, y, b, info)
        elif v == "traker":
            feats = traker_pass(model, state, k, x, y, b, info)
        elif v.startswith("bergson"):
            feats = bergson_pass(v, net, task, k, x, y, b, info)
        else:
            feats = tda_pass(v, model, state, k, x, y, b, info)
        seconds = min(seconds, time.perf_counter() - t0)
    peak = peak_rss_mb()
    names = info.get("names") or list(params)
    if args.check and feats is not None:  # after the peak is read: the exact gradients are not the variant's
        from featurize_lm_peers import check

        d, width = sum(params[p].numel() for p in names), feats.shape[1]
        scale = 1.0 if args.worker.startswith("bergson") else (d / width) ** 0.5  # TRAKer: P g / sqrt(d)
        row["check"] = check(net, task, {"x": x[: args.batch], "y": y[: args.batch]}, feats[: args.batch],
                             names, scale)
    covered = sum(params[p].numel() for p in names) if args.worker != "floor" else dim
    return {**row, "chose": info["chose"], "width": info["width"], "dim": dim, "coverage": covered / dim,
            "seconds": seconds, "examples_per_s": args.n / seconds, "peak_rss_mb": peak, "base_rss_mb": base}


def run_child(lib: str, k: int, args: argparse.Namespace) -> dict:
    python = args.bergson_python if lib.startswith("bergson") else sys.executable
    cmd = [python, __file__, "--worker", lib, "--k", str(k), "--n", str(args.n), "--batch", str(args.batch),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--data", args.data]
    try:
        proc = subprocess.run(cmd + (["--check"] if args.check else []), capture_output=True, text=True)
    except OSError as exc:  # e.g. a --bergson-python that is not there
        return {"library": lib, "k": k, "skipped": f"cannot start {python}: {exc}"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"library": lib, "k": k, "skipped": f"failed: {last[:160]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: dict, b: dict | None, key: str) -> str:
    return f"{a[key] / b[key]:.2f}" if b and "skipped" not in b else ""


def table_row(r: dict, by: dict, check: bool) -> str:
    """One markdown row: speed against the floor, traker and bergson (global); memory against traker."""
    if "skipped" in r:
        return f"| {r['k']} | {r['library']} | {r['skipped']} |"
    name = r["library"] if r["chose"] == r["library"] else f"{r['library']} ({r['chose']})"
    speed = " | ".join(_ratio(r, by.get(b), "examples_per_s") for b in ("floor", "traker", "bergson"))
    line = (f"| {r['k']} | {name} | {r['width'] or '-'} | {r['coverage']:.1%} | {r['examples_per_s']:.1f} | {speed} | "
            f"{r['peak_rss_mb']:.0f} | +{r['peak_rss_mb'] - r['base_rss_mb']:.0f} | "
            f"{_ratio(r, by.get('traker'), 'peak_rss_mb')} |")
    if check:
        c = r.get("check")
        line += f" {c['rms']:.3f} (JL {c['jl']:.3f}) |" if c else " |"
    return line


def report(results: list[dict], args: argparse.Namespace) -> None:
    done = [r for r in results if "skipped" not in r]
    dim = f"d={done[0]['dim']:,}, " if done else ""
    print(f"\nMLP 784-512-512-10 ({dim}{args.n} MNIST train examples, batch {args.batch}, {args.threads} threads, "
          f"CPU, best of {args.repeats}); floor: plain batched forward + backward, .grad only")
    print("| k | variant (chose) | width | coverage | ex/s | x floor | x traker | x bergson | peak MB | growth MB "
          "| x traker peak |" + (" check: rms err (JL) |" if args.check else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.check else ""))
    floor = next((r for r in results if r["library"] == "floor"), None)
    for k in args.k:
        by = {r["library"]: r for r in results if r["k"] == k}
        if floor is not None:
            by["floor"] = floor
        for lib in args.libs:
            if lib in by:
                print(table_row(by[lib] if lib != "floor" else {**floor, "k": k}, by, args.check))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--n", type=int, default=1024, help="training examples featurized per run")
    p.add_argument("--batch", type=int, default=128, help="examples per featurize call (every library)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed passes per process; the fastest is reported")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--libs", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="floor (batched forward + backward), tda (dense fp32), tda-bf16 (dense, precision='bf16'), "
                        "tda-sparse (SJLT, s=1), tda-factored (per-layer k_in = k_out = sqrt(k/3)), "
                        "tda-tensorsketch (per-layer TensorSketch into k), traker (dense, its CPU projector), "
                        "bergson (global projection), bergson-module (per-module p x p)")
    p.add_argument("--check", action="store_true",
                   help="compare the first batch's feature inner products with exact per-example gradients'")
    p.add_argument("--bergson-python", default=os.environ.get("TDA_BERGSON_PYTHON", sys.executable),
                   help="interpreter of the bergson rows (bergson needs its own venv; env TDA_BERGSON_PYTHON)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.worker:
        args.k = args.k[0]
        print(json.dumps(worker(args)))
        return
    results = []
    for k in args.k:
        for lib in args.libs:
            if lib == "floor" and any(r["library"] == "floor" for r in results):
                continue  # the floor does not depend on k
            r = run_child(lib, k, args)
            results.append(r)
            if "skipped" in r:
                print(f"{lib:>16} k={k:<5} {r['skipped']}", flush=True)
                continue
            print(f"{lib:>16} k={k:<5} {r['examples_per_s']:8.1f} ex/s  {r['seconds']:7.2f} s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['peak_rss_mb'] - r['base_rss_mb']:.0f} over "
                  f"{r['base_rss_mb']:.0f} MB loaded)  {r['chose']}", flush=True)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
