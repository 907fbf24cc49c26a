"""Quanda's offline metrics per tda scorer on MNIST and CIFAR-2 (issue 25, item 5).

For each data set: an ensemble of 3 models per setup (clean, grouped labels, 10% flipped labels,
a white patch on 75% of one class, images of another data set labelled as one class), tda's
features computed once per setup and every scorer below applied to them; Quanda's metric classes
score the explanations. LDS: ``--subsets`` random halves, one model each, the margin of the true
class (Quanda's ``LinearDatamodelingMetric`` with the retrained models' logits). Model
randomization re-explains through :class:`tda.integrations.quanda.TDAExplainer` with Quanda's
randomized model. Peers measured in the same run: Quanda's ``TRAK`` wrapper (traker, one model)
and Captum's ``TracInCPFast``; ``random`` is Quanda's ``RandomExplainer``.

Needs quanda (see ``pyproject.toml``'s ``benchmark`` extra)::

    python benchmarks/quanda.py                        # both data sets, ~20 min on 2 cores
    python benchmarks/quanda.py --only mnist --subsets 16 --no-peers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the package it measures: its folder goes last on the path, so that
# ``import quanda`` finds the installed package and ``import quanda_setups`` this folder's module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import quanda_setups as S  # noqa: E402
from quanda_peers import import_quanda, peer_explanations  # noqa: E402

import tda  # noqa: E402
from tda.workflows.curation import loss_self_influence  # noqa: E402
from tda.core.features import ArrayFeatures, FeatureBlock  # noqa: E402
from tda.core.kernel import score_matrix  # noqa: E402

#: name -> (Attributor scorer name, scorer_options, checkpoints used)
VARIANTS = {
    "trak (default)": ("trak", {}, 3),
    "trak q=1": ("trak", {"q_weight": False}, 3),
    "trak normalize": ("trak", {"normalize": True}, 3),
    "trak normalize lambda_rel=10": ("trak", {"normalize": True, "lambda_rel": 10.0}, 3),
    "trak lambda_rel=1": ("trak", {"lambda_rel": 1.0}, 3),
    "trak lambda_rel=100": ("trak", {"lambda_rel": 100.0}, 3),
    "trak M=1": ("trak", {}, 1),
    "trak normalize M=1": ("trak", {"normalize": True}, 1),
    "tracin": ("tracin", {}, 3),
    "graddot": ("graddot", {}, 3),
    "gradcos": ("gradcos", {}, 3),
}
METRICS = ("lds", "class", "subclass", "top-k card.", "randomization", "mislabel", "shortcut", "mixed")
HIGHER = {"randomization": False}


def featurize(src: S.Source, setup: S.Setup, states: list[dict], k: int) -> tuple[ArrayFeatures, FeatureBlock]:
    classes = int(setup.extra.get("classes", src.classes))
    model = S.model_for(src, states[0]) if classes != src.classes else src.build()
    attr = tda.Attributor(model, states, k=k, batch_size=256)
    train = attr.featurize({"x": setup.x, "y": setup.y})
    return ArrayFeatures(train, range(len(states))), attr.featurize({"x": setup.qx, "y": setup.qt})


def _first(block: FeatureBlock, models: int) -> FeatureBlock:
    return FeatureBlock(block.ids, block.feats[:models], block.q[:models])


def tda_scores(train: ArrayFeatures, query: FeatureBlock, self_influence: bool = False) -> dict[str, tuple]:
    """Per variant: (scores (m, n), loss self-influence (n,) or None)."""
    from tda.api import scorer_by_name

    whole = train.block
    out = {}
    for name, (scorer_name, options, models) in VARIANTS.items():
        feats = ArrayFeatures(_first(whole, models), range(models))
        scorer = scorer_by_name(scorer_name, models, options).fit(feats)
        scores = score_matrix(_first(query, models), scorer, feats)
        si = loss_self_influence(scorer, feats)[1] if self_influence else None
        out[name] = (scores, si)
    return out


def lds_logits(src: S.Source, setup: S.Setup, subsets: int, folder: Path) -> tuple[list, list, dict]:
    """Random halves, one model each: their ids, saved files and logits on the queries."""
    gen = torch.Generator().manual_seed(42)
    ids, files, logits = [], [], {}
    for s in range(subsets):
        rows = torch.randperm(len(setup.x), generator=gen)[: len(setup.x) // 2]
        state = S.train(src, setup.x[rows], setup.y[rows], seed=1000 + s)
        with torch.no_grad():
            logits[s] = S.model_for(src, state)(setup.qx)
        files.append(str(folder / f"subset{s}.pt"))
        torch.save(state, files[-1])
        ids.append(rows.tolist())
    return ids, files, logits


def evaluate(metric, explanations: dict, update) -> dict[str, float]:
    out = {}
    for name, scores in explanations.items():
        metric.reset()
        update(metric, torch.as_tensor(scores))
        out[name] = float(metric.compute()["score"])
    return out


def clean_metrics(src, setup, states, args, folder, q, peers) -> dict[str, dict[str, float]]:
    train, query = featurize(src, setup, states, args.k)
    expl = {n: s for n, (s, _) in tda_scores(train, query).items()}
    expl.update(peers("clean", setup, states))
    model = S.model_for(src, states[-1])
    data = torch.utils.data.TensorDataset(setup.x, setup.y)
    ids, files, logits = lds_logits(src, setup, args.subsets, folder)
    lds = q.LinearDatamodelingMetric(model=model, train_dataset=data, subset_ids=ids, subset_ckpt_filenames=files,
                                     m=len(ids), cache_dir=str(folder))
    res = {"lds": evaluate(lds, expl, lambda m, e: m.update(e, setup.qt, setup.qx, subset_logits=logits)),
           "class": evaluate(q.ClassDetectionMetric(model=model, train_dataset=data), expl,
                             lambda m, e: m.update(e, setup.qt)),
           "top-k card.": evaluate(q.TopKCardinalityMetric(model=model, train_dataset=data), expl,
                                   lambda m, e: m.update(e))}
    res["randomization"] = randomization(src, setup, states, args, folder, q, data)
    return res


def randomization(src, setup, states, args, folder, q, data) -> dict[str, float]:
    """Spearman between explanations of the trained and of Quanda's randomized model (lower: better)."""
    from tda.integrations.quanda import TDAExplainer

    files = []
    for i, st in enumerate(states):
        files.append(str(folder / f"model{i}.pt"))
        torch.save(st, files[-1])
    out = {}
    for name, (scorer_name, options, models) in VARIANTS.items():
        if models != len(states) or "lambda_rel" in options:
            continue
        kw = {"scorer": scorer_name, "scorer_options": options or None, "k": args.k}
        explainer = TDAExplainer(model=S.model_for(src, states[0]), train_dataset=data, checkpoints=files, **kw)
        metric = q.ModelRandomizationMetric(model=S.model_for(src, states[0]), model_id=name.replace(" ", "_"),
                                            cache_dir=str(folder), train_dataset=data, checkpoints=files,
                                            explainer_cls=TDAExplainer, expl_kwargs=kw)
        metric.update(explainer.explain(setup.qx, setup.qt), setup.qx, setup.qt)
        out[name] = float(metric.compute()["score"])
    return out


def setup_metric(src, setup, states, args, q, peers) -> dict[str, float]:
    """The metric of one altered setup (subclass, mislabel, shortcut, mixed)."""
    model = S.model_for(src, states[-1])
    data = torch.utils.data.TensorDataset(setup.x, setup.y)
    if setup.name in ("shortcut", "mixed"):
        setup = S.keep_predicted(src, setup, states[-1])
    train, query = featurize(src, setup, states, args.k)
    found = tda_scores(train, query, self_influence=setup.name == "mislabel")
    if setup.name == "mislabel":
        si = {n: torch.as_tensor(_rank_safe(s)) for n, (_, s) in found.items()}
        si.update(peers("mislabel", setup, states))
        return {n: float(q.MislabelingDetectionMetric(model=model, train_dataset=data,
                                                      mislabeling_indices=setup.extra["mislabelled"],
                                                      precomputed_self_influence=s).compute()["score"])
                for n, s in si.items()}
    expl = {n: s for n, (s, _) in found.items()}
    expl.update(peers(setup.name, setup, states))
    if setup.name == "subclass":
        metric = q.SubclassDetectionMetric(model=model, train_dataset=data,
                                           train_subclass_labels=setup.extra["subclass_labels"])
        return evaluate(metric, expl, lambda m, e: m.update(e, setup.extra["query_subclasses"]))
    if setup.name == "shortcut":
        metric = q.ShortcutDetectionMetric(model=model, train_dataset=data, shortcut_indices=setup.extra[
            "shortcut_indices"], shortcut_cls=setup.extra["shortcut_cls"], filter_by_non_shortcut=False,
                                           filter_by_shortcut_pred=False)
        return evaluate(metric, expl, lambda m, e: m.update(e))
    metric = q.MixedDatasetsMetric(model=model, train_dataset=data,
                                   adversarial_indices=setup.extra["adversarial_flags"])
    return evaluate(metric, expl, lambda m, e: m.update(e))


def _rank_safe(si: np.ndarray) -> np.ndarray:
    """As :meth:`TDAExplainer.self_influence`: largest magnitude n^2 (Quanda's tie-break is 1e-4 x row)."""
    top = float(np.abs(si).max())
    return (si * (len(si) ** 2 / top)).astype(np.float32) if top > 0 else si.astype(np.float32)


def run_source(src: S.Source, args, q) -> dict[str, dict[str, float]]:
    t0 = time.time()
    ensemble = lambda st: [S.train(src, st.x, st.y, seed, int(st.extra.get("classes", src.classes)))  # noqa: E731
                           for seed in range(3)]
    peers = peer_explanations(src, args) if args.peers else (lambda *a: {})
    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        setup = S.clean(src, args.queries)
        res.update(clean_metrics(src, setup, ensemble(setup), args, Path(tmp), q, peers))
        plans = [S.mislabel(src), S.shortcut(src, args.queries), S.mixed(src, args.queries, args.adversarial)]
        if src.classes > 2:
            plans.insert(0, S.subclass(src, args.queries))
        for setup in plans:
            key = {"subclass": "subclass", "mislabel": "mislabel", "shortcut": "shortcut", "mixed": "mixed"}[setup.name]
            res[key] = setup_metric(src, setup, ensemble(setup), args, q, peers)
            print(f"  {src.name} {setup.name}: {time.time() - t0:.0f} s", file=sys.stderr)
    return res


def table(name: str, res: dict[str, dict[str, float]]) -> str:
    rows = list(VARIANTS) + sorted({n for m in res.values() for n in m} - set(VARIANTS))
    cols = [m for m in METRICS if m in res]
    head = "| " + name + " | " + " | ".join(c + ("" if HIGHER.get(c, True) else " (lower)") for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f"{res[c][r]:.3f}" if r in res[c] else "-" for c in cols]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["mnist", "cifar2"], default=None)
    p.add_argument("--n-mnist", type=int, default=3000)
    p.add_argument("--n-cifar2", type=int, default=2000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--adversarial", type=int, default=100)
    p.add_argument("--subsets", type=int, default=40)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = import_quanda()
    sources = {"mnist": lambda: S.mnist_source(args.n_mnist, 1000),
               "cifar2": lambda: S.cifar2_source(args.n_cifar2, 1000)}
    out = {}
    for key, make in sources.items():
        if args.only in (None, key):
            t = time.time()
            src = make()
            out[src.name] = run_source(src, args, q)
            print(f"\n{table(f'{src.name} (n={len(src.x)}, {time.time() - t:.0f} s)', out[src.name])}\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
