"""What ``tda curate`` and ``tda unlearn`` print: rankings and noise metrics, forget sets, the retraining checks."""

from __future__ import annotations

from typing import Any

from pipelines.layout import RunPaths


def print_curation(res: dict[str, Any], paths: RunPaths, top: int = 10) -> None:
    import pyarrow.parquet as pq

    noise = res.get("label_noise")
    head = f"curation of {res['n_train']} training examples, ranked by {res['method']}"
    table = pq.read_table(paths.root / "curation" / "ranking.parquet").slice(0, top).to_pydict()
    lm = all(y == -1 for y in table["label"])  # a language model: no class labels
    what = "sequences shuffled" if lm else "labels flipped"
    print(head + (f"; {noise['flipped']} {what} (data.label_noise {noise['fraction']:g})" if noise else ""))
    if noise:
        print(f"  {'method':<12} {'ROC-AUC':>8} {'AP':>7}  found in top 5% / 10% / 20%")
        for name, m in res["methods"].items():
            f = m["found_at"]
            print(f"  {name:<12} {m['auc']:>8.3f} {m['ap']:>7.3f}  {f['5%']:.2f} / {f['10%']:.2f} / {f['20%']:.2f}")
        if "best_baseline" in res:
            verdict = "matches or beats" if res["method_matches_best_baseline"] else "is BELOW"
            print(f"  {res['method']} {verdict} the best baseline ({res['best_baseline']}) in ROC-AUC")
    if lm:
        print(f"  top {top} suspects (id):", ", ".join(str(i) for i in table["id"]))
    else:
        print(f"  top {top} suspects (id, label, predicted):",
              ", ".join(f"{i} ({y}->{p})" for i, y, p in zip(table["id"], table["label"], table["predicted"])))
    if "check" in res:
        metric = res["check"].get("metric", "accuracy")
        c, a = res["check"], res["check"][metric]
        d = c["flagged_minus_random"]
        name = "accuracy" if metric == "accuracy" else "completion log-probability"
        print(f"  retrained without {c['removed']} examples ({c['remove_fraction']:.0%}), {c['seeds']} seeds: query {name} "
              f"without flagged {a['flagged']['mean']:.4f} [{a['flagged']['ci_low']:.4f}, {a['flagged']['ci_high']:.4f}], "
              f"without random {a['random']['mean']:.4f} [{a['random']['ci_low']:.4f}, {a['random']['ci_high']:.4f}]; "
              f"difference {d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
    print(f"written to {paths.root / 'curation'}/ (ranking.csv, ranking.parquet, curation.json)")


def _ci(x: dict[str, float]) -> str:
    return f"{x['mean']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]"


def print_unlearning(res: dict[str, Any], paths: RunPaths) -> None:
    p, c = res["predicted"], res["control_predicted"]
    print(f"unlearning {res['behaviour']} ({res['output']}, scorer {res['scorer']}): forget set of {res['k']} "
          f"training examples (first ids {res['forget_ids'][:8]})")
    cal = p.get("calibrated")
    print(f"  predicted change of the group's output: {p['group']:+.3f} raw"
          + (f", {cal['group']:+.3f} calibrated" if cal else " (uncalibrated: run `tda validate` to calibrate)")
          + f"; random control of the same size: {c['group']:+.3f} raw")
    if "check" in res:
        ch = res["check"]
        print(f"  retrained, {ch['seeds']} paired seeds: actual change {_ci(ch['forget']['actual_group'])} without the "
              f"forget set, {_ci(ch['control']['actual_group'])} without the control")
        rho = ch.get("spearman_predicted_actual")
        if rho is not None:
            print(f"  per query, predicted against actual: Spearman {rho:.3f}")
        for arm in ("full", "forget", "control") if "accuracy" in ch.get("full", {}) else ():
            a = ch[arm]["accuracy"]
            other = f", other queries {a['other_queries']['mean']:.3f}" if a.get("other_queries") else ""
            print(f"  accuracy, {arm:<7}: group {a['group']['mean']:.3f}{other}, all {a['all_queries']['mean']:.3f}")
    if "approximate" in res:
        ap = res["approximate"]
        print(f"  without retraining ({ap['steps']} gradient-difference steps, lr {ap['lr']:g}; masked: top "
              f"{ap['mask_fraction']:.0%} of weights):")
        for name, m in ap["variants"].items():
            dist = m.get("output_distance_to_retrained", m.get("margin_distance_to_retrained"))
            acc = lambda part: f" acc {m[part + '_accuracy']:.3f}" if part + "_accuracy" in m else ""  # noqa: E731
            print(f"    {name:<27} forget{acc('forget')} loss {m['forget_loss']:.3f}, retain{acc('retain')} loss "
                  f"{m['retain_loss']:.3f}, query{acc('query')} loss {m['query_loss']:.3f}, membership AUC "
                  f"{m['membership_auc']:.3f}" + (f", output distance to retrained {dist:.2f}" if dist is not None else ""))
    print(f"written to {paths.root / 'unlearning'}/unlearning.json")
