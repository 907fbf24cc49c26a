"""``tda report RUN``: one self-contained ``report.html`` a person reads (images inline as PNG data
URIs in their stored colours, whatever their layout; texts whole, wrapped and HTML-escaped, cut only
at ``score.text_chars``), refreshed at the end of ``tda run``, ``validate``, ``curate`` and ``unlearn``.

Per shown query: the input, its label and the predicted label with probability, then the top
proponents and opponents as a grid with labels and signed scores. For scorers that sum one term
per checkpoint (TRAK, TracInCP, Grad-Dot) each shown attribution also gets the mean and spread of
its per-checkpoint terms, and is marked distinguishable from noise when ``|mean| > 2 sd / sqrt(M)``
(the Bayesian TDA seed paper finds most pairs are not). Then the curation and unlearning tables
and the validation table and plots, where those commands have run.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stores import workflow_results
from stores._io import atomic_write
from tda.errors import DataError, StoreCorruptError, TDAError

from pipelines.families import family_for
from pipelines.layout import RunPaths, load_checkpoint_list
from pipelines.query.lean import query_predictions
from pipelines.run import datasets_for
from pipelines.report import label_text, predicted_text
from pipelines.run_folder import class_names, label_column, labels_of, stored_features
from pipelines.spec.schema import RunConfig

logger = logging.getLogger(__name__)
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.grid{display:flex;flex-wrap:wrap;gap:6px}"
         ".cell{border:1px solid #ddd;padding:4px;font-size:12px;width:110px}.cell img{width:96px;image-rendering:pixelated}"
         ".cell.wide{width:min(460px,100%)}.pos{color:#070}.neg{color:#a00}.noise{color:#888}"
         ".txt{font-family:monospace;font-size:13px;white-space:pre-wrap;overflow-wrap:anywhere;text-align:left;"
         "max-height:24em;overflow:auto;background:#fafafa;padding:4px}.cut{color:#888;font-style:italic}")


def png_uri(pixels: np.ndarray) -> str:
    """A (H, W) or (H, W, 3) array (uint8, or floats scaled to their range) as an inline PNG data URI."""
    from PIL import Image  # matplotlib's own image dependency; far lighter to import

    if pixels.dtype != np.uint8:
        lo, hi = float(np.min(pixels)), float(np.max(pixels))
        pixels = np.round(255 * (pixels - lo) / (hi - lo if hi > lo else 1.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_shape(cfg: RunConfig, length: int) -> tuple[int, ...] | None:
    """(C, H, W) of a flattened channel-major image of ``length`` values, when it can be told."""
    from pipelines.families.images import IMAGE_DATA

    if cfg.data.name in IMAGE_DATA and int(np.prod(IMAGE_DATA[cfg.data.name][0])) == length:
        return IMAGE_DATA[cfg.data.name][0]
    for c in (1, 3):
        side = int(round((length / c) ** 0.5))
        if c * side * side == length:
            return (c, side, side)
    return None


class Renderer:
    """HTML for one example of a split: its image, its text, or its id.

    Images go through :func:`tda.data.images.display_image` (``tda/data/images.py``): stored HWC or CHW
    pictures (nested lists, arrays, PIL images, ``{"bytes", "path"}`` dicts) in the layout of
    ``data.image_layout``, flat channel-major vectors in the shape of :func:`image_shape`. Texts are
    shown whole, wrapped, up to ``score.text_chars`` characters (None: all of them).
    """

    def __init__(self, cfg: RunConfig, dataset: Any, texts: dict[int, str] | None = None) -> None:
        self.cfg, self.ds, self.texts = cfg, dataset, texts or {}
        from tda.data.loading import example_ids

        self.rows = {int(i): r for r, i in enumerate(example_ids(dataset))}
        self.warned = False

    def __call__(self, example: int) -> str:
        if int(example) in self.texts:  # the family decodes its own (token ids, for language models)
            return self.text(self.texts[int(example)])
        d, row = self.cfg.data, self.rows.get(int(example))
        if row is None:
            return ""
        item = self.ds[row]
        if d.image_column in item:
            img = self.image(item[d.image_column])
            if img is not None:
                return f'<img src="{png_uri(img)}">'
        for column in (d.text_column, "text"):
            if column in item and isinstance(item[column], str):
                return self.text(item[column])
        return ""

    def image(self, value: Any) -> np.ndarray | None:
        """One stored image as uint8 (H, W) or (H, W, C); None when it is no image or its layout
        cannot be told (a warning, once per renderer: the report shows the rest)."""
        from tda.data.images import display_image

        if value is None:
            return None
        layout = getattr(self.cfg.data, "image_layout", "auto")
        try:
            img = display_image(value, layout)
            if img is None and np.ndim(value) == 1:  # a flat vector: channel-major, in the data set's shape
                shape = image_shape(self.cfg, int(np.size(value)))
                img = display_image(value, layout, shape) if shape is not None else None
        except DataError as exc:
            if not self.warned:
                logger.warning("report: images of column %r not shown (%s)", self.cfg.data.image_column, exc)
                self.warned = True
            return None
        return img

    def text(self, text: str) -> str:
        """``text`` escaped and wrapped, cut to ``score.text_chars`` characters with an ellipsis and
        the count of characters left out."""
        limit = getattr(self.cfg.score, "text_chars", None)
        if limit is None or len(text) <= limit:
            return f'<div class="txt">{html.escape(text)}</div>'
        omitted = len(text) - limit
        return (f'<div class="txt">{html.escape(text[:limit])}\u2026<span class="cut"> ({omitted} more '
                f'character{"" if omitted == 1 else "s"} not shown; score.text_chars = {limit})</span></div>')


def _box(content: str, rest: str = "") -> str:
    """A grid cell holding ``content`` (an example) then ``rest``; wide when the example is a text."""
    wide = " wide" if content.startswith('<div class="txt"') else ""
    return f'<div class="cell{wide}">{content}{rest}</div>'


def per_checkpoint_terms(cfg: RunConfig, paths: RunPaths, scorer: Any, query_ids: list[int],
                         train_ids: np.ndarray) -> np.ndarray | None:
    """(q, t, M) per-checkpoint terms of the shown pairs, summing to their scores; None when the
    scorer's vectors are not one slice per checkpoint."""
    try:
        q = stored_features(paths, query_ids, "query")
        t = stored_features(paths, [int(i) for i in train_ids.reshape(-1)], "train")
    except TDAError:  # an id missing from a store (a changed run): the report shows what it can
        return None
    a, b = scorer.transform_query(q), scorer.transform_train(t)
    m = q.feats.shape[0]
    if a.shape[1] != m * q.feats.shape[2] or m < 2:
        return None
    a3, b3 = a.reshape(len(query_ids), m, -1), b.reshape(*train_ids.shape, m, -1)
    return np.einsum("qmk,qtmk->qtm", a3.astype(np.float64), b3.astype(np.float64))


def _cell(render: Renderer, example: int, label: Any, score: float, terms: np.ndarray | None) -> str:
    sign = "pos" if score > 0 else "neg"
    noise = ""
    if terms is not None:
        mean, sd = terms.mean() * len(terms), terms.std(ddof=1) * len(terms)  # per-checkpoint estimates of the score
        ok = abs(mean) > 2 * sd / np.sqrt(len(terms))
        noise = f'<br><span class="{"" if ok else "noise"}">{mean:+.2e} &plusmn; {sd:.1e} over {len(terms)}' \
                f'{"" if ok else " (noise)"}</span>'
    return _box(render(example), f'<br>id {example} label {html.escape(str(label))}<br>'
                f'<span class="{sign}">{score:+.3e}</span>{noise}')


def query_section(cfg: RunConfig, paths: RunPaths, shown: int, k: int) -> str:
    """Every shown query with its proponent and opponent grids."""
    from pipelines.stages import load_scorer

    data, family = datasets_for(cfg, paths), family_for(cfg)
    texts = getattr(family, "example_texts", None)
    train_r, query_r = (Renderer(cfg, data[split], texts(cfg, paths, split) if texts else None)
                        for split in ("train", "query"))
    column, names = label_column(cfg), class_names(cfg, data)
    labels, qlabels = labels_of(data["train"], column), labels_of(data["query"], column)
    top = read_topk(paths)
    preds = query_predictions(cfg, paths) or {}  # recorded by `tda run`, else computed (classes only)
    rows = list(range(min(shown, len(top["query_ids"]))))
    qids = [int(top["query_ids"][r]) for r in rows]
    scorer = load_scorer(cfg, paths)
    both = np.concatenate([top["proponent_ids"][rows, :k], top["opponent_ids"][rows, :k]], axis=1)
    terms = per_checkpoint_terms(cfg, paths, scorer, qids, both) if rows else None
    parts = []
    for n, (r, qid) in enumerate(zip(rows, qids)):
        head = f"query id {qid}, label {html.escape(label_text(qlabels.get(qid), names))}"
        if qid in preds:
            head += f", predicted {html.escape(predicted_text(preds[qid], names))}"
        grids = []
        for side, key in (("proponents (training on them raises the query's output)", "proponent"),
                          ("opponents (training on them lowers it)", "opponent")):
            cells = [_cell(train_r, int(i), label_text(labels.get(int(i)), names), float(s),
                           None if terms is None else terms[n, j + (0 if key == "proponent" else k)])
                     for j, (i, s) in enumerate(zip(top[f"{key}_ids"][r, :k], top[f"{key}_scores"][r, :k]))]
            grids.append(f"<p>{side}</p><div class='grid'>{''.join(cells)}</div>")
        parts.append(f"<h3>{head}</h3><div class='grid'>{_box(query_r(qid))}</div>{''.join(grids)}")
    return "<h2>Queries</h2>" + "".join(parts)


def read_topk(paths: RunPaths) -> dict[str, np.ndarray]:
    """``scores/topk.npz``; a damaged one is a :class:`StoreCorruptError` naming the rerun."""
    try:
        with np.load(paths.scores / "topk.npz", allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise StoreCorruptError(f"{paths.scores / 'topk.npz'} cannot be read ({type(exc).__name__}: {exc}); rerun "
                                f"`tda run CONFIG --out {paths.root}`: it recomputes damaged scores") from exc


def guarded(section: Callable[..., str], title: str, fix: str, *args: Any) -> str:
    """``section(*args)``, or a note saying its file cannot be read and ``fix`` (a damaged
    curation, unlearning or validation record never stops the rest of the report)."""
    try:
        return section(*args)
    except Exception as exc:  # noqa: BLE001 - any damage to a derived record: say so, draw the rest
        logger.warning("report: the %s section is left out (%s: %s); %s", title, type(exc).__name__, exc, fix)
        return (f"<h2>{html.escape(title)}</h2><p class='noise'>left out: its record cannot be read "
                f"({html.escape(type(exc).__name__)}: {html.escape(str(exc)[:200])}); {html.escape(fix)}</p>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def curation_section(cfg: RunConfig, paths: RunPaths) -> str:
    if not workflow_results.exists(paths.root, "curation"):
        return ""
    import pyarrow.parquet as pq

    res = workflow_results.load(paths.root, "curation")
    rows = [[name, *(f"{m[x]:.3f}" for x in ("auc", "ap")), *(f"{v:.2f}" for v in m["found_at"].values())]
            for name, m in res["methods"].items() if m]
    out = f"<h2>Curation (ranked by {html.escape(res['method'])})</h2>"
    if rows:
        out += _table(["method", "ROC-AUC", "AP", "found 5%", "10%", "20%"], rows)
    top = pq.read_table(paths.root / "curation" / "ranking.parquet").slice(0, 24).to_pydict()
    data = datasets_for(cfg, paths)
    render, names = Renderer(cfg, data["train"]), class_names(cfg, data)
    cells = [_box(render(int(i)), f'<br>id {i}' + (f": label {html.escape(label_text(y, names))}, predicted "
                                                  f"{html.escape(label_text(p, names))}" if y != -1 else "")
                  + f'<br>{html.escape(res["method"])} {s:.3f}')
             for i, y, p, s in zip(top["id"], top["label"], top["predicted"], top[res["method"]])]
    return out + f"<p>top suspects</p><div class='grid'>{''.join(cells)}</div>"


def unlearning_section(paths: RunPaths) -> str:
    if not workflow_results.exists(paths.root, "unlearning"):
        return ""
    res = workflow_results.load(paths.root, "unlearning")
    rows = []
    for arm, pred in (("forget", res["predicted"]), ("control", res["control_predicted"])):
        actual = res.get("check", {}).get(arm, {}).get("actual_group")
        rows.append([arm, res["k"], f"{pred['group']:+.3f}", f"{pred['calibrated']['group']:+.3f}" if "calibrated" in pred
                     else "uncalibrated", f"{actual['mean']:+.3f} [{actual['ci_low']:+.3f}, {actual['ci_high']:+.3f}]"
                     if actual else "not retrained"])
    return (f"<h2>Unlearning: {html.escape(res['behaviour'])}</h2>"
            + _table(["set", "k", "predicted", "calibrated", "actual (95% CI)"], rows))


def validation_section(paths: RunPaths) -> str:
    folder = paths.root / "validation"
    if not workflow_results.exists(paths.root, "validation"):
        return ""
    res = workflow_results.load(paths.root, "validation")
    rows = [[name, f"{r['report']['mean']:.3f} [{r['report']['ci_low']:.3f}, {r['report']['ci_high']:.3f}]",
             f"{r['calibration']['fit']['slope']:.3g}"] for name, r in res.get("scorers", {}).items()]
    plots = "".join(f'<img style="max-width:45%" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                    for p in sorted(folder.glob("*.png")))
    return (f"<h2>Validation ({html.escape(str(res.get('protocol', 'classic')))} protocol)</h2>"
            + _table(["scorer", "LDS, report fold", "calibration slope"], rows) + plots)


def write_report(cfg: RunConfig, paths: RunPaths, shown: int | None = None, k: int = 8) -> Path:
    """Write ``report.html`` in the run folder; its path."""
    ckpts = load_checkpoint_list(paths)
    head = (f"<h1>{html.escape(cfg.name)}: which training examples drove these predictions</h1>"
            f"<p>scorer {html.escape(cfg.score.scorer)}, {len(ckpts)} checkpoint(s); score &gt; 0: training on the "
            "example raises the query's measured output (the margin for classifiers, log p(completion) for "
            "language models)</p>")
    body = (query_section(cfg, paths, shown if shown is not None else max(cfg.score.show, 6), min(k, cfg.score.topk))
            + guarded(curation_section, "Curation", "rerun `tda curate CONFIG` to rewrite it", cfg, paths)
            + guarded(unlearning_section, "Unlearning", "rerun `tda unlearn CONFIG` to rewrite it", paths)
            + guarded(validation_section, "Validation", "rerun `tda validate CONFIG` to rewrite it", paths))
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title>" \
           f"<style>{STYLE}</style></head><body>{head}{body}</body></html>"
    target = paths.root / "report.html"
    if not (target.is_file() and target.read_text(encoding="utf-8") == page):  # a rerun rewrites nothing
        atomic_write(target, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return target


def answer_page(paths: RunPaths, ans: Any, split: str = "query") -> str:
    """``tda query --html``: one self-contained page of a query answer (each example's image or
    text, label and class name, prediction, and the proponent / opponent grids with labels and
    signed scores); texts cut at the answer's ``chars`` (``--chars``, else ``score.text_chars``)."""
    from pipelines.run_folder import recorded_config

    cfg = recorded_config(paths)
    cfg.score.text_chars = getattr(ans, "chars", cfg.score.text_chars)
    data, family = datasets_for(cfg, paths), family_for(cfg)
    names = getattr(ans, "names", None)
    texts = getattr(family, "example_texts", None)
    train_r, query_r = (Renderer(cfg, data[s], texts(cfg, paths, s) if texts else None) for s in ("train", split))
    parts = []
    for row, q in enumerate(ans.as_dict()["queries"]):
        head = f"{html.escape(split)} id {q['id']}, label {html.escape(label_text(q['label'], names))}"
        if "predicted" in q:
            head += f", predicted {html.escape(predicted_text((q['predicted'], q['p_predicted']), names))}"
        grids = [f"<p>{title}</p><div class='grid'>"
                 + "".join(_cell(train_r, e["id"], label_text(e["label"], names), e["score"], None) for e in q[key])
                 + "</div>"
                 for title, key in (("proponents (training on them raises the query's output)", "proponents"),
                                    ("opponents (training on them lowers it)", "opponents"))]
        parts.append(f"<h3>{head}</h3><div class='grid'>{_box(query_r(q['id']))}</div>{''.join(grids)}")
    title = f"{cfg.name}: tda query ({ans.scorer}, {ans.kind} index over {ans.n_index} training examples)"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")


def refresh_report(cfg: RunConfig, paths: RunPaths) -> None:
    """:func:`write_report` at the end of a command; a report that cannot be drawn is a warning,
    never a failed command (the run's results are already written)."""
    try:
        write_report(cfg, paths)
    except Exception as exc:  # noqa: BLE001
        logger.warning("report.html not refreshed (%s: %s); run `tda report %s` to retry", type(exc).__name__, exc,
                       paths.root)


__all__ = ["Renderer", "answer_page", "refresh_report", "image_shape", "per_checkpoint_terms", "png_uri", "write_report"]
