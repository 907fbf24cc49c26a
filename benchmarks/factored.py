"""Factored (LoGra-style) against dense projection: featurize throughput and score agreement.

For each model (the MNIST MLP of configs/mnist_trak.yaml and the char GPT-2 of
configs/shakespeare_lm.yaml, one trained model each, trained once and cached), this featurizes
the training and query sets with the factored projection at several ``k_in x k_out`` and with
the dense projection at the *same* total width k over the *same* parameters (those of the layers
the factored projection covers: all of the MLP's; the LM's linear layers, without embeddings and
layer norms) -- the dense anchor, measured in the same run -- then prints:

- throughput of the training-set featurization (examples/s, from building the featurizer to the
  last feature, projection matrices generated inside the timed region) and its ratio to dense;
- the mean per-query Spearman correlation of TRAK (lambda_rel 0.01) and Grad-Dot scores between
  factored and dense features;
- the same correlation between two dense projections that differ only in their seed, the
  agreement any random projection of that width can reach (the noise floor);
- for the LM (small enough to hold the exact per-example gradients), the Grad-Dot correlation of
  each projection with the unprojected gradients.

    python benchmarks/factored.py                                  # both models (about 20 min on 2 cores)
    python benchmarks/factored.py --only classifier --n 2000       # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("TDA_CACHE", Path.home() / ".cache" / "tda")) / "bench-factored"
SETTINGS = {"classifier": [(16, 16), (32, 32), (64, 64)], "lm": [(8, 8), (16, 16), (32, 32)]}


def setup(name: str, args: argparse.Namespace):
    """Config and trained run folder of one model (trained on first use, then reused)."""
    from pipelines.config import load_config
    from pipelines.run import RunPaths, claim_run_dir
    from pipelines.stages import stage_train

    if name == "classifier":
        over = [f"data.train_size={args.n}", f"data.query_size={args.queries}", "train.models=1"]
        cfg = load_config(ROOT / "configs" / "mnist_trak.yaml", over + [f"data.root={args.mnist}"])
    else:
        over = [f"data.query_size={args.queries}", "model.options.queries=[]"]
        cfg = load_config(ROOT / "configs" / "shakespeare_lm.yaml", over + [f"data.root={args.corpus}"])
    folder = f"{name}-n{args.n}-q{args.queries}" if name == "classifier" else f"{name}-q{args.queries}"
    paths = RunPaths(CACHE / folder)
    claim_run_dir(cfg, paths.root, overwrite=False)
    stage_train(cfg, paths, progress=False)
    return cfg, paths


def featurize(cfg, paths, sets: list[str]) -> tuple[dict[str, np.ndarray], float, int]:
    """``({split: (n, k) features}, train seconds, k)`` with featurize overrides ``sets``."""
    from pipelines.config import parse_config
    from pipelines.run import collate_for, datasets_for, load_checkpoint_list, make_featurizer
    from tda.data.loading import iter_batches

    cfg = parse_config(cfg.to_dict(), sets)
    ckpt = paths.checkpoints / load_checkpoint_list(paths)[-1]["file"]
    data, out, seconds = datasets_for(cfg, paths), {}, 0.0
    for split in ("train", "query"):
        t0 = time.perf_counter()
        fz = make_featurizer(cfg, split, paths)
        batches = iter_batches(data[split], collate_for(cfg), cfg.featurize.batch_size)
        out[split] = np.concatenate([phi for _, phi, _ in fz.featurize(ckpt, 0, batches)])
        if split == "train":
            seconds = time.perf_counter() - t0
    return out, seconds, out["train"].shape[1]


def scores(f: dict[str, np.ndarray], scorer) -> np.ndarray:
    from tda.core.features import ArrayFeatures, FeatureBlock
    from tda.core.kernel import score_matrix

    tr, q = f["train"], f["query"]
    source = ArrayFeatures(FeatureBlock(np.arange(len(tr)), tr[None], np.ones((1, len(tr)), np.float32)), [0])
    scorer.fit(source)
    return score_matrix(FeatureBlock(np.arange(len(q)), q[None], np.ones((1, len(q)), np.float32)), scorer, source)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(np.nanmean([spearmanr(x, y).statistic for x, y in zip(a, b)]))


def both(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from tda.scorers import GradDotScorer, TRAKScorer

    return {"trak": scores(f, TRAKScorer(lambda_rel=0.01)), "graddot": scores(f, GradDotScorer())}


def bench(name: str, args: argparse.Namespace) -> list[dict]:
    from pipelines.config import parse_config
    from pipelines.run import make_featurizer
    from tda.scorers import GradDotScorer

    cfg, paths = setup(name, args)
    covered = make_featurizer(parse_config(cfg.to_dict(), ["featurize.projection=factored"])).names
    same = f"featurize.params={json.dumps(covered)}"  # dense over the parameters the factored projection covers
    exact = None
    if name == "lm":  # exact per-example gradients: identity factors on every covered layer
        f, _, d = featurize(cfg, paths, ["featurize.projection=factored", "featurize.k_in=null", "featurize.k_out=null"])
        exact = scores(f, GradDotScorer())  # (TRAK would need a d x d kernel)
        print(f"{name}: exact gradients over the factored layers, d = {d:,}", flush=True)
    rows = []
    for k_in, k_out in SETTINGS[name]:
        fac, t_fac, k = featurize(cfg, paths, ["featurize.projection=factored", f"featurize.k_in={k_in}",
                                               f"featurize.k_out={k_out}"])
        dense, t_dense, _ = featurize(cfg, paths, [f"featurize.k={k}", "featurize.seed=0", same])
        other, _, _ = featurize(cfg, paths, [f"featurize.k={k}", "featurize.seed=1", same])
        sf, sd, so = both(fac), both(dense), both(other)
        n = len(fac["train"])
        row = {"model": name, "k_in x k_out": f"{k_in}x{k_out}", "k": k, "factored ex/s": n / t_fac,
               "dense ex/s": n / t_dense, "speed ratio": t_dense / t_fac,
               **{f"rho {s} fac-dense": spearman(sf[s], sd[s]) for s in ("trak", "graddot")},
               **{f"rho {s} dense-dense": spearman(so[s], sd[s]) for s in ("trak", "graddot")}}
        if exact is not None:
            row["rho graddot fac-exact"] = spearman(sf["graddot"], exact)
            row["rho graddot dense-exact"] = spearman(sd["graddot"], exact)
        rows.append(row)
        print("  ".join(f"{key} {_fmt(key, val)}" for key, val in row.items()), flush=True)
    return rows


def _fmt(key: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.1f}" if "ex/s" in key else f"{value:.1f}x" if "ratio" in key else f"{value:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["classifier", "lm"])
    p.add_argument("--n", type=int, default=5000, help="MNIST training examples (the LM uses its config's 1,000)")
    p.add_argument("--queries", type=int, default=100, help="query examples per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = [r for name in ([args.only] if args.only else ["classifier", "lm"]) for r in bench(name, args)]
    cols = ["model", "k_in x k_out", "k", "factored ex/s", "dense ex/s", "speed ratio", "rho trak fac-dense",
            "rho trak dense-dense", "rho graddot fac-dense", "rho graddot dense-dense", "rho graddot fac-exact",
            "rho graddot dense-exact"]
    print(f"\n{args.threads} threads, load average {os.getloadavg()[0]:.1f}; speed ratio = factored / dense ex/s; "
          "rho = mean per-query Spearman of scores")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(c, r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
