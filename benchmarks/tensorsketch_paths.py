"""The two ways tensorsketch sketches a layer, timed, and the cost model's constants fitted to them.

:class:`tda.projections.tensorsketch.TensorSketchProjector` sketches ``G = sum_t delta_t a_t^T`` of a layer
either by forming ``G`` (a batched matmul, then one scatter of its ``d_in d_out`` entries:
``sketch_formed``) or by one real FFT of each side's CountSketch per position (``spectrum``). Its
cost model (``SCATTER_COST``, ``FFT_COST``, in units of one multiply-add of the matmul) picks the
cheaper per layer. This script times the matmul alone, ``form`` and ``fft`` for transformer-like
shapes (the char LM's: 128 positions, d 257 -> 256 / 768 / 1024 and 1025 -> 256) and a small
one, at k = 1024 and 4096, best of ``--repeats`` interleaved passes, and prints per shape the
implied constants, the path the current model picks and the measured winner.

    python benchmarks/tensorsketch_paths.py
    python benchmarks/tensorsketch_paths.py --threads 1 --repeats 9
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tda.gradients.captures import LayerSpec  # noqa: E402
from tda.projections.tensorsketch import FFT_COST, SCATTER_COST, TensorSketchProjector, sketch_formed, spectrum  # noqa: E402

SHAPES = ((257, 256), (257, 768), (257, 1024), (1025, 256), (65, 74))


def time_shape(k: int, d_in: int, d_out: int, batch: int, positions: int, repeats: int) -> dict[str, float]:
    """Best seconds of the matmul alone, of ``form`` and of ``fft`` for one layer shape."""
    g = torch.Generator().manual_seed(0)
    a, delta = torch.randn(batch, positions, d_in, generator=g), torch.randn(batch, positions, d_out, generator=g)

    def side(d: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, k, (d,), generator=g), torch.randint(0, 2, (d,), generator=g).float() * 2 - 1

    cols, signs = side(d_in * d_out)
    side_in, side_out = side(d_in), side(d_out)
    runs = {"matmul": lambda: delta.transpose(1, 2) @ a, "form": lambda: sketch_formed(a, delta, cols, signs, k),
            "fft": lambda: spectrum(a, delta, side_in, side_out, k)}
    best = {name: math.inf for name in runs}
    for _ in range(repeats):  # interleaved: a slow moment of the machine hits every way alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", nargs="*", type=int, default=[1024, 4096])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--positions", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"model constants: SCATTER_COST {SCATTER_COST:g}, FFT_COST {FFT_COST:g}; batch {a.batch}, "
          f"{a.positions} positions, {a.threads} threads\n")
    print("| k | d_in x d_out | matmul ms | form ms | fft ms | implied scatter | implied fft (at scatter "
          f"{SCATTER_COST:g}) | model picks | faster |\n|---|---|---|---|---|---|---|---|---|")
    implied = []
    for k in a.k:
        for d_in, d_out in SHAPES:
            t = time_shape(k, d_in, d_out, a.batch, a.positions, a.repeats)
            mac = t["matmul"] / (a.batch * a.positions * d_in * d_out)  # seconds per multiply-add
            scatter = (t["form"] - t["matmul"]) / (mac * a.batch * d_in * d_out)
            fft = (t["fft"] / (mac * a.batch * a.positions) - SCATTER_COST * (d_in + d_out)) / (k * math.log2(k))
            implied.append(fft)
            pick = TensorSketchProjector([LayerSpec("w", d_in, d_out, True, "linear")], k=k).path(
                LayerSpec("w", d_in, d_out, True, "linear"), a.positions)
            faster = "form" if t["form"] <= t["fft"] else "fft"
            print(f"| {k} | {d_in} x {d_out} | {t['matmul'] * 1e3:.1f} | {t['form'] * 1e3:.1f} | {t['fft'] * 1e3:.1f} "
                  f"| {scatter:.0f} | {fft:.1f} | {pick} | {faster}{'' if pick == faster else ' (missed)'} |",
                  flush=True)
    print(f"\nimplied FFT_COST: median {np.median(implied):.1f}, range {min(implied):.1f} .. {max(implied):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
