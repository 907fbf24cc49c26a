"""End to end, one process: tensorsketch featurization of the char LM or the BERT classifier of
``benchmarks/featurize_lm.py`` under two values of the cost model's ``FFT_COST`` (the old 5 and
the current one), interleaved with the forward + backward floor, best of ``--repeats`` passes.

    python benchmarks/tensorsketch_fft_cost.py char 4096
    python benchmarks/tensorsketch_fft_cost.py bert 1024 --old 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import tda  # noqa: E402
import tda.projections.tensorsketch as ts  # noqa: E402
from featurize_lm import bert_batches, floor, lm_batches  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("char", "gpt2", "bert"))
    p.add_argument("k", type=int)
    p.add_argument("--old", type=float, default=5.0, help="the FFT_COST compared with the current one")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(2)
    model, task, data, units = bert_batches(a.n) if a.model == "bert" else lm_batches(a.model, a.n)

    def collate(b):  # BERT rows padded to their batch's longest, as featurize_lm.py does
        width = int(b["attention_mask"].sum(1).max())
        return {key: v[:, :width] if v.ndim == 2 else v for key, v in b.items()}

    attr = tda.Attributor(model, [model.state_dict()], collate if a.model == "bert" else None, task=task, k=a.k,
                          batch_size=16, projection="tensorsketch")
    attr.featurize({key: v[:16] for key, v in data.items()})  # warm-up
    costs = {"floor": None, f"FFT_COST {a.old:g}": a.old, f"FFT_COST {ts.FFT_COST:g}": ts.FFT_COST}
    best: dict[str, float] = {}
    for _ in range(a.repeats):
        for name, cost in costs.items():
            start = time.perf_counter()
            if cost is None:
                floor(model, task, data, 16)
            else:
                ts.FFT_COST = cost
                attr.featurize(data)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    unit = "rows" if a.model == "bert" else "tokens"
    for name, seconds in best.items():
        print(f"{a.model} k={a.k} {name}: {units / seconds:.0f} {unit}/s, {best['floor'] / seconds:.2f}x floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
