"""tda's EK-FAC against kronfluence's on the same models and ground truth (issue 12).

Reads a finished ``tda run`` with ``score.scorer: ekfac`` (its checkpoints, training and query
sets, and the dense ``scores/scores.npy``) and the small-drop ground truth it was validated on.
First it recomputes the run's LDS from its own scores with the validator's folds and asserts that
it equals ``validation/validation.json`` (so the ground truth and folds here are the validator's).
Then kronfluence fits EK-FAC factors on the same training rows under every attributed checkpoint
(cross entropy, the sampled Fisher and damping 0.1 x the mean corrected eigenvalue per layer, as
tda's defaults), scores the queries' classification margin ``logit_y - logsumexp_{j!=y} logit_j``
against every training example, and the per-checkpoint matrices are averaged as tda's ekfac
scorer does. kronfluence's sign is flipped (its score > 0 means training on i LOWERS the
measurement; tda's > 0 means it raises f). The table gives LDS on the reporting and tuning folds
with their 95% bootstrap intervals, and the mean per-query Spearman of kronfluence's scores with
tda's. kronfluence's score matrix is cached under ``--cache``.

    pip install --no-deps kronfluence accelerate einconv einops opt-einsum safetensors
    python benchmarks/ekfac_kronfluence.py
    python benchmarks/ekfac_kronfluence.py --fisher empirical     # both libraries' empirical Fisher
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = Path.home() / ".cache" / "tda" / "ekfac-lds"
INSTALL = "pip install --no-deps kronfluence accelerate einconv einops opt-einsum safetensors"
#: the gap the issue allows between tda's EK-FAC and kronfluence's (LDS, reporting fold)
TOLERANCE = 0.02


def require_kronfluence() -> Any:
    """The kronfluence module, or exit naming the install command that keeps the installed torch."""
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer  # noqa: F401  (fails without its dependencies)
    except ImportError as exc:
        raise SystemExit(f"kronfluence is not installed or incomplete ({exc}); install it without touching torch: "
                         f"{INSTALL}") from exc
    return kronfluence


# ----------------------------------------------------------------------------- runs and ground truth
def load_run(run_dir: Path) -> dict[str, Any]:
    """Config, paths, dense scores and validation result of a finished, validated ekfac run."""
    from pipelines.layout import RunPaths
    from pipelines.run_folder import recorded_config

    paths = RunPaths(run_dir)
    need = {"run.json": paths.run_file, "scores/scores.npy": paths.scores / "scores.npy",
            "validation/validation.json": paths.root / "validation" / "validation.json",
            "checkpoints/checkpoints.json": paths.checkpoint_list}
    missing = [name for name, p in need.items() if not p.is_file()]
    if missing:
        raise SystemExit(f"{run_dir} is not a finished, validated tda run (missing {', '.join(missing)}); make it "
                         "with `tda run benchmarks/families/mnist_mlp_ekfac.yaml --out DIR` and `tda validate` "
                         "(validate.protocol=small-drop), or pass --run-dir")
    cfg = recorded_config(paths)
    if cfg.score.scorer != "ekfac":
        raise SystemExit(f"{run_dir} was scored with {cfg.score.scorer!r}, not ekfac")
    validation = json.loads(need["validation/validation.json"].read_text())
    return {"cfg": cfg, "paths": paths, "scores": np.load(need["scores/scores.npy"], allow_pickle=False),
            "validation": validation}


def load_truth(gt_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Subset masks (J, n) and mean retrained query outputs (J, m), read as the validator reads them."""
    from pipelines.ground_truth import GroundTruth, GroundTruthSpec

    manifest = gt_dir / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{gt_dir} holds no ground truth (no manifest.json); pass --gt, the folder of "
                         "validate.ground_truth_dir")
    spec = json.loads(manifest.read_text())["spec"]
    gt = GroundTruth(gt_dir, GroundTruthSpec(**{k: v for k, v in spec.items() if k != "mask_hash"}),
                     references=True)  # regenerates the masks and checks them against mask_hash
    if gt.pending():
        raise SystemExit(f"{gt_dir}: {len(gt.pending())} retrainings are unfinished; complete `tda validate`")
    return gt.masks, gt.mean_outputs()


def fold_lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, folds: dict, fold: str) -> dict:
    """LDS (mean, bootstrap interval) on one fold of queries x subsets (``report`` or ``tune``)."""
    from tda.validation import lds

    q, j = folds[f"{fold}_queries"], folds[f"{fold}_subsets"]
    return lds(scores[q], masks[j], outputs[np.ix_(j, q)]).as_dict()


def check_reproduces(run: dict, masks: np.ndarray, outputs: np.ndarray, folds: dict) -> None:
    """The run's own scores must give validation.json's ekfac figure (same truth, folds, metric)."""
    want = run["validation"]["scorers"]["ekfac"]["report"]["mean"]
    got = fold_lds(run["scores"], masks, outputs, folds, "report")["mean"]
    if abs(got - want) > 1e-6:
        raise SystemExit(f"{run['paths'].root}: LDS from scores/scores.npy is {got:.6f}, validation.json says "
                         f"{want:.6f}; the ground truth (--gt) or folds are not the ones it was validated on")


# ----------------------------------------------------------------------------- kronfluence
def tensors(cfg: Any, paths: Any, split: str) -> tuple[Any, Any]:
    """Inputs and labels of a split in row order (the order of the score matrix and the masks)."""
    import torch

    from pipelines.families import family_for
    from tda.data.loading import iter_batches

    family = family_for(cfg)
    batches = [b for _, b in iter_batches(family.datasets(cfg, paths)[split], family.collate(cfg), 512)]
    return torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches])


def margin_task(kronfluence: Any, seed: int) -> Any:
    """kronfluence Task: cross-entropy training loss (``sample``: labels drawn from the model, the
    true Fisher) and the classification margin as the measurement, tda's ClassificationTask."""
    import torch
    import torch.nn.functional as F

    from tda.models.tasks import classification_margin

    generator = torch.Generator().manual_seed(seed)

    class MarginTask(kronfluence.Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(batch[0])
            if not sample:
                return F.cross_entropy(logits, batch[1], reduction="sum")
            with torch.no_grad():
                probs = torch.softmax(logits.detach().double(), dim=1).cpu()
                drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
            return F.cross_entropy(logits, drawn, reduction="sum")

        def compute_measurement(self, batch, model):
            return classification_margin(model(batch[0]), batch[1]).sum()

    return MarginTask()


def kron_checkpoint(run: dict, entry: dict, data: dict, work: Path, fisher: str, seed: int) -> np.ndarray:
    """kronfluence's EK-FAC scores (m, n) under one checkpoint, in tda's sign."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from pipelines.families import family_for
    from tda.featurizers.gradient import load_checkpoint

    kf = require_kronfluence()
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # torch.cuda.amp names
    cfg, paths = run["cfg"], run["paths"]
    model = family_for(cfg).build_model(cfg)
    model.load_state_dict(load_checkpoint(paths.checkpoint_file(entry)))
    model.eval()
    task = margin_task(kf, seed + int(entry["id"]))
    torch.manual_seed(seed + int(entry["id"]))
    analyzer = Analyzer(f"ckpt{int(entry['id'])}", prepare_model(model, task), task, cpu=True, disable_tqdm=True,
                        output_dir=str(work), log_level=logging.WARNING)
    analyzer.fit_all_factors("factors", data["train"], per_device_batch_size=256, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac",
                                                         use_empirical_fisher=fisher == "empirical"))
    analyzer.compute_pairwise_scores("scores", "factors", data["query"], data["train"],
                                     per_device_query_batch_size=len(data["query"]),
                                     per_device_train_batch_size=250, overwrite_output_dir=True,
                                     score_args=ScoreArguments(damping_factor=None))  # None: 0.1 x mean Lambda
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return -theirs  # kronfluence: > 0 lowers the measurement; tda: > 0 raises f


def kron_scores(run: dict, cache: Path, fisher: str, seed: int, refit: bool) -> tuple[np.ndarray, dict]:
    """Mean over the run's checkpoints of kronfluence's scores (as tda's ekfac scorer), cached."""
    import torch
    from torch.utils.data import TensorDataset

    from pipelines.layout import load_checkpoint_list

    entries = load_checkpoint_list(run["paths"])
    key = {"run": str(run["paths"].root), "fisher": fisher, "seed": seed, "damping": "0.1 x mean Lambda",
           "checkpoints": [e["sha256"] for e in entries]}
    out = cache / f"scores-{fisher}-seed{seed}.npy"
    meta_file = out.with_suffix(".json")
    if not refit and out.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            return np.load(out, allow_pickle=False), meta
    cfg, paths = run["cfg"], run["paths"]
    data = {split: TensorDataset(*tensors(cfg, paths, split)) for split in ("train", "query")}
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    work = cache / "work"
    start, per = time.time(), []
    for entry in entries:
        per.append(kron_checkpoint(run, entry, data, work, fisher, seed))
        print(f"  kronfluence checkpoint {entry['id']}: {time.time() - start:.0f} s", flush=True)
    scores = np.mean(per, axis=0)
    meta = {"key": key, "wall_s": time.time() - start, "checkpoints": len(entries),
            "combine": "mean of the per-checkpoint matrices (tda: 1/M sum_m tau_m)"}
    shutil.rmtree(work, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(out, scores)
    meta_file.write_text(json.dumps(meta, indent=1))
    return scores, meta


# ----------------------------------------------------------------------------- comparison
def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation of two (m, n) score matrices across training rows."""
    from tda.validation.metrics import spearman_columns

    return float(np.nanmean(spearman_columns(np.asarray(a, np.float64).T, np.asarray(b, np.float64).T)))


def cell(res: dict) -> str:
    return f"{res['mean']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}]"


def table(rows: list[tuple[str, dict, dict, str]]) -> str:
    lines = ["| method | LDS report fold [95% CI] | LDS tuning fold [95% CI] | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {cell(rep)} | {cell(tune)} | {note} |" for name, rep, tune, note in rows]
    return "\n".join(lines)


def optional_run(run_dir: Path, wait: bool) -> dict | None:
    """A run that may still be in the making (the exact run): None, with a note, until it is validated."""
    done = run_dir / "validation" / "validation.json"
    while wait and not done.is_file():
        print(f"waiting for {done} ...", flush=True)
        time.sleep(60)
    if not done.is_file():
        print(f"note: {done} does not exist yet; the exact tda row is left out (--wait-exact waits for it)")
        return None
    return load_run(run_dir)


def same_checkpoints(a: dict, b: dict) -> bool:
    """Whether two runs attribute the same checkpoint files (sha256), as the shared ground truth assumes."""
    from pipelines.layout import load_checkpoint_list

    return [e["sha256"] for e in load_checkpoint_list(a["paths"])] == \
        [e["sha256"] for e in load_checkpoint_list(b["paths"])]


def run_note(run: dict) -> str:
    f = run["cfg"].featurize
    return f"tda {run['paths'].root.name}: featurize.k_in={f.k_in}, k_out={f.k_out}, validation.json's figure"


def report(runs: dict[str, dict], kron: np.ndarray, meta: dict, truth: tuple, folds: dict, fisher: str) -> None:
    """The table, the Spearman agreement and the verdict on issue 12's tolerance."""
    masks, outputs = truth
    rows, labels = [], {"knull": "tda EK-FAC exact (knull)", "k32": "tda EK-FAC 32x32 projected (k32)"}
    for name, run in runs.items():
        rows.append((labels.get(name, f"tda EK-FAC ({name})"), fold_lds(run["scores"], masks, outputs, folds, "report"),
                     fold_lds(run["scores"], masks, outputs, folds, "tune"), run_note(run)))
    kr = fold_lds(kron, masks, outputs, folds, "report")
    rows.append((f"kronfluence EK-FAC (exact, {fisher} Fisher)", kr, fold_lds(kron, masks, outputs, folds, "tune"),
                 f"fit+score {meta['wall_s']:.0f} s for {meta['checkpoints']} checkpoints (CPU), mean over checkpoints"))
    print("\n" + table(rows) + "\n")
    for name, run in runs.items():
        rho = mean_spearman(run["scores"], kron)
        print(f"mean per-query Spearman (over {kron.shape[1]} training rows), tda {name} vs kronfluence: {rho:.4f}")
        if rho < 0:
            print("  WARNING: negative correlation: a sign convention differs")
    if "knull" in runs:
        rho = mean_spearman(runs["knull"]["scores"], runs["k32"]["scores"]) if "k32" in runs else float("nan")
        print(f"mean per-query Spearman, tda knull vs tda k32: {rho:.4f}")
    for name, run in runs.items():
        gap = fold_lds(run["scores"], masks, outputs, folds, "report")["mean"] - kr["mean"]
        verdict = "within" if abs(gap) <= TOLERANCE else "outside (above)" if gap > 0 else "outside (below)"
        print(f"LDS tda {name} - kronfluence (report fold): {gap:+.3f}: {verdict} +-{TOLERANCE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=CACHE / "k32", help="the validated 32x32 ekfac run")
    ap.add_argument("--exact-dir", type=Path, default=CACHE / "knull", help="the validated exact ekfac run")
    ap.add_argument("--gt", type=Path, default=CACHE / "gt", help="its ground truth (validate.ground_truth_dir)")
    ap.add_argument("--cache", type=Path, default=CACHE / "kronfluence", help="kronfluence's cached scores")
    ap.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled",
                    help="kronfluence's Fisher (tda's default: sampled)")
    ap.add_argument("--seed", type=int, default=0, help="seed of kronfluence's label draws")
    ap.add_argument("--refit", action="store_true", help="recompute kronfluence's scores even if cached")
    ap.add_argument("--wait-exact", action="store_true", help="wait for the exact run's validation.json")
    args = ap.parse_args()
    require_kronfluence()
    from tda.validation import split_folds

    runs = {"k32": load_run(args.run_dir)}
    exact = optional_run(args.exact_dir, args.wait_exact)
    if exact is not None:
        runs = {"knull": exact, **runs}
    masks, outputs = load_truth(args.gt)
    v = runs["k32"]["cfg"].validate
    folds = split_folds(outputs.shape[1], masks.shape[0], v.tune_fraction, v.seed)
    for name, run in runs.items():
        if same_checkpoints(run, runs["k32"]) is False:
            print(f"WARNING: {name}'s checkpoints differ from {args.run_dir}'s, on which kronfluence is fitted")
        if run["scores"].shape != (outputs.shape[1], masks.shape[1]):
            raise SystemExit(f"{run['paths'].root}: scores {run['scores'].shape} do not match the ground truth's "
                             f"{outputs.shape[1]} queries x {masks.shape[1]} training rows")
        check_reproduces(run, masks, outputs, folds)
    print(f"ground truth {args.gt}: {masks.shape[0]} subsets x {masks.shape[1]} train, {outputs.shape[1]} queries; "
          f"the runs' LDS from scores.npy reproduce validation.json (to 1e-6)", flush=True)
    kron, meta = kron_scores(runs["k32"], args.cache, args.fisher, args.seed, args.refit)
    report(runs, kron, meta, (masks, outputs), folds, args.fisher)


if __name__ == "__main__":
    main()
