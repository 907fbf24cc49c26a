"""Why gradient scorers miss on the Adam-trained DDPM: drop-one effects against gradient alignment.

On the DDPM recipe of ``benchmarks/families/ddpm.yaml`` (300 MNIST images, small UNet, fixed
batches, timesteps and noise via zero data weights) it retrains once per picked training image
with that image's weight set to 0 and measures the change of every query's f (L_simple on the
query grid). First-order theory for SGD says the change is ``+lr <grad f_q, grad L_i>`` summed
over the steps that used i, so it should correlate positively with the alignment of the two
gradients at the final model (what TracIn / Grad-Dot-style scorers rank by). The script prints
that correlation for the configured optimizer, and a half-weight retraining as a linearity check
(its change should be half the drop's).

    python benchmarks/ddpm_drop_one.py                    # Adam, the recipe's optimizer
    python benchmarks/ddpm_drop_one.py --optimizer sgd --lr 0.09
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.config import load_config  # noqa: E402
from pipelines.families.diffusion import drawn_output  # noqa: E402
from pipelines.families.jobs import job_data  # noqa: E402
from pipelines.families.registry import family_for  # noqa: E402
from pipelines.families.unet import train_ddpm  # noqa: E402
from tda.featurizers.diffusion import DiffusionTask, noise_from_seeds  # noqa: E402


def flat_grad(model, value: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])


def alignment(task, full, log, x, train_ids, picks, xq, steps, seeds) -> np.ndarray:
    """(picks, m) ``<grad L_i, grad f_q>`` at the final model, L_i (the training loss) at i's draw
    of the last epoch, f_q the configured output on the query grid."""
    loss = DiffusionTask(task.schedule, "loss")
    gq = torch.stack([flat_grad(full, drawn_output(task, full, xq[j: j + 1], steps[j: j + 1], seeds[j: j + 1]).sum())
                      for j in range(len(xq))])
    last = log.epoch == log.epoch.max()
    gi = []
    for i in picks:
        row = np.nonzero(last & (log.example_id == train_ids[i]))[0][0]
        batch = {"x": x[i: i + 1], "t": torch.tensor([log.timestep[row]]),
                 "noise": noise_from_seeds(np.array([log.noise_seed[row]]), x.shape[1:])}
        gi.append(flat_grad(full, loss.output(full, batch).sum()))
    return (torch.stack(gi) @ gq.T).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "families" / "ddpm.yaml"))
    ap.add_argument("--optimizer", choices=("adam", "sgd"), help="default: the config's")
    ap.add_argument("--lr", type=float, help="default: the config's train.lr")
    ap.add_argument("--picks", type=int, default=12, help="training images dropped one at a time")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config)
    fam, t = family_for(cfg), cfg.train
    sched, opt = fam.schedule(cfg), args.optimizer or fam.options(cfg).optimizer
    lr = t.lr if args.lr is None else args.lr
    train, train_ids, query, query_ids = job_data(cfg, "query")
    x, xq, n = train["x"], query["x"], len(train_ids)
    steps, seeds = fam.grid_draws(cfg, "query")(0, query_ids)
    task = DiffusionTask(sched, fam.options(cfg).output)
    if not 1 <= args.picks <= n:
        raise SystemExit(f"--picks must be between 1 and the {n} training images")

    def change(i: int, weight: float) -> np.ndarray:
        """Change of every query's f when image i trains with ``weight`` instead of 1."""
        w = torch.ones(n)
        w[i] = weight
        model, _ = train_ddpm(lambda: fam.build_model(cfg), x, train_ids, sched, epochs=t.epochs, lr=lr,
                              batch_size=t.batch_size, seed=t.seed, weights=w, optimizer=opt)
        with torch.no_grad():
            return (drawn_output(task, model, xq, steps, seeds) - f0).numpy()

    full, log = train_ddpm(lambda: fam.build_model(cfg), x, train_ids, sched, epochs=t.epochs, lr=lr,
                           batch_size=t.batch_size, seed=t.seed, weights=torch.ones(n), optimizer=opt)
    with torch.no_grad():
        f0 = drawn_output(task, full, xq, steps, seeds)
    picks = np.random.default_rng(0).choice(n, args.picks, replace=False)
    drops = np.stack([change(i, 0.0) for i in picks])  # (picks, m)
    align = alignment(task, full, log, x, train_ids, picks, xq, steps, seeds)
    per_query = [spearmanr(drops[:, j], align[:, j]).correlation for j in range(drops.shape[1])]
    half = change(picks[0], 0.5)
    print(f"optimizer {opt}, lr {lr}, {args.picks} images dropped one at a time, {len(query_ids)} queries; "
          f"final query loss {f0.mean():.4f}, mean |change| {np.abs(drops).mean():.3g}")
    print(f"  Spearman(change when i is dropped, <grad L_i, grad f_q>): pooled "
          f"{spearmanr(drops.ravel(), align.ravel()).correlation:+.3f}, mean per query {np.nanmean(per_query):+.3f} "
          "(SGD theory: > 0)")
    print(f"  linearity: half-weight change / drop change {np.median(half / drops[0]):.3f} "
          f"(Pearson {pearsonr(drops[0], half).statistic:.4f})")


if __name__ == "__main__":
    main()
