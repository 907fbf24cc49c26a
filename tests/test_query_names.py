"""``tda query`` answers a person reads: class names, whole texts, ``--list`` and ids in errors.

A tiny user-family run (random checkpoints, ``model.check_trained: false``) whose label column is a
``datasets.ClassLabel`` and whose rows carry texts; queries are a seeded random subset, so their ids
are not contiguous. Outputs are compared with references built from the source tables, the
recorded ``scores/topk.npz`` and the family's own predictions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from torch import nn

from pipelines.cli.main import main
from pipelines.layout import RunPaths
from pipelines.query.lean import NotLean, lean_answer, write_labels
from pipelines.report import WRAP_WIDTH, label_text, predicted_text, text_fields
from pipelines.run_folder import class_names, recorded_config
from tda.errors import QueryError

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "bird"]
MODEL = ("from torch import nn\n\ndef build(width: int = 8):\n"
         "    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))\n")


def _text(i: int) -> str:
    """A text per source row, 30 to ~2400 characters, with non-ASCII characters."""
    return f"example {i} café naïve — " + " ".join(f"w{i}-{j}" for j in range(3 + 37 * (i % 9)))


def _project(root: Path) -> dict[str, Any]:
    """model.py, two random checkpoints, a train table (70 rows) and a query file (20 rows, 12
    drawn) with a ClassLabel ``label`` and a ``text`` column, and cfg.yaml; the source columns."""
    (root / "code").mkdir(parents=True)
    (root / "code" / "model.py").write_text(MODEL)
    x = np.random.default_rng(0).normal(size=(90, 6)).astype(np.float32)
    y, texts = np.argmax(x[:, :3], axis=1), [_text(i) for i in range(90)]
    features = datasets.Features({"x": datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(names=NAMES), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"x": x[:70].tolist(), "label": y[:70].tolist(), "text": texts[:70]},
                               features=features).save_to_disk(str(root / "train"))
    datasets.Dataset.from_dict({"x": x[70:].tolist(), "label": y[70:].tolist(), "text": texts[70:]},
                               features=features).to_parquet(str(root / "q.parquet"))
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict(), root / f"m{seed}.pt")
    (root / "cfg.yaml").write_text(
        "model: {factory: code/model.py:build, options: {width: 8}, checkpoints: [m0.pt, m1.pt], "
        "check_trained: false}\n"
        "data: {train_path: train, query_path: q.parquet, image_column: x, train_size: 60, query_size: 12}\n"
        "featurize: {k: 16, shard_size: 32}\nscore: {topk: 3, show: 1}\n")
    # ids are file positions: train ids index rows 0..69, query ids rows 70..89
    return {"cfg": root / "cfg.yaml", "train": {"label": y[:70].tolist(), "text": texts[:70]},
            "query": {"label": y[70:].tolist(), "text": texts[70:]}}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The finished run (read only: copy it to change anything) and the source columns."""
    root = tmp_path_factory.mktemp("names")
    src = _project(root / "proj")
    assert main(["run", str(src["cfg"]), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run", src


def _topk(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "scores" / "topk.npz") as z:
        return {k: z[k] for k in z.files}


def _predictions(run: Path) -> dict[int, tuple[int, float]]:
    """Reference predictions: the family's own, over the run's checkpoints."""
    from pipelines.families import family_for

    paths = RunPaths(run)
    cfg = recorded_config(paths)
    p = family_for(cfg).example_predictions(cfg, paths, "query")
    return {int(i): (int(c), float(q)) for i, c, q in zip(p["ids"], p["predicted"], p["p_predicted"])}


def _query_json(capsys, run: Path, *args: str) -> dict[str, Any]:
    assert main(["query", "--run", str(run), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_class_names_come_from_config_then_classlabel_then_id2label(tmp_path) -> None:
    def cfg(family: str = "user", names: list[str] | None = None, hf: str | None = None) -> Any:
        return SimpleNamespace(data=SimpleNamespace(class_names=names, label_column="y"),
                               model=SimpleNamespace(family=family, hf=hf))

    labelled = {"train": datasets.Dataset.from_dict(
        {"y": [0, 1]}, features=datasets.Features({"y": datasets.ClassLabel(names=["neg", "pos"])}))}
    numbered = {"train": datasets.Dataset.from_dict(
        {"y": [0, 1]}, features=datasets.Features({"y": datasets.ClassLabel(names=["0", "1"])}))}
    plain = {"train": datasets.Dataset.from_dict({"y": [0, 1]})}
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"1": "POSITIVE", "0": "NEGATIVE"}}))
    assert class_names(cfg(names=["a", "b"]), labelled) == ["a", "b"]
    assert class_names(cfg(), labelled) == ["neg", "pos"]
    assert class_names(cfg("hf", hf=str(tmp_path)), labelled) == ["neg", "pos"]
    assert class_names(cfg("hf", hf=str(tmp_path)), plain) == ["NEGATIVE", "POSITIVE"]
    assert class_names(cfg("hf", hf=str(tmp_path)), numbered) == ["NEGATIVE", "POSITIVE"]  # "0", "1" name nothing
    assert class_names(cfg("classifier"), labelled) is None  # the demo families read the "label" column
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    assert class_names(cfg("hf", hf=str(tmp_path)), plain) is None
    assert class_names(cfg("user", hf=str(tmp_path)), plain) is None


def test_labels_and_texts_formatting() -> None:
    assert (label_text(3, NAMES + ["fish"]), label_text(3), label_text(None), label_text(7, NAMES)) == \
        ("fish (3)", "3", "?", "7")
    assert predicted_text((1, 0.934), NAMES) == "dog (1) p 0.93" and predicted_text((1, 0.934)) == "1 (p 0.93)"
    assert text_fields("abcdef", None) == {"text": "abcdef"} and text_fields("abcdef", 6) == {"text": "abcdef"}
    assert text_fields("abcdef", 4) == {"text": "abcd\u2026", "text_omitted": 2} and text_fields(None, 4) == {}


def test_cli_text_shows_names_predictions_and_whole_texts(text_run, capsys, monkeypatch) -> None:
    run, src = text_run
    top, preds = _topk(run), _predictions(run)
    row, q = 1, int(_topk(run)["query_ids"][1])
    argv = ["query", "--run", str(run), "--example", str(q), "-k", "2"]
    assert main(argv) == 0
    lean = capsys.readouterr().out
    y, (c, p) = src["query"]["label"][q], preds[q]
    lines = lean.splitlines()
    assert lines[0] == f"  query id {q}  label {NAMES[y]} ({y})  predicted {NAMES[c]} ({c}) p {p:.2f}"
    blocks = _text_blocks(lines)
    assert [head for head, _ in blocks] == [lines[0]] + [
        f"      train id {int(i):>6}  label {NAMES[src['train']['label'][int(i)]]} ({src['train']['label'][int(i)]})"
        f"  score {float(s):+.4e}"
        for key in ("proponent", "opponent") for i, s in zip(top[f"{key}_ids"][row][:2], top[f"{key}_scores"][row][:2])]
    texts = [src["query"]["text"][q]] + [src["train"]["text"][int(i)] for key in ("proponent", "opponent")
                                         for i in top[f"{key}_ids"][row][:2]]
    for (_, body), want in zip(blocks, texts):  # whole, wrapped: the same words in the same order
        assert " ".join(" ".join(ln.split("| ", 1)[1] for ln in body).split()) == " ".join(want.split())
    assert max(len(ln) for ln in lines) <= WRAP_WIDTH and any(len(t) > 1000 for t in texts)
    monkeypatch.setattr("pipelines.cli.query.lean_answer", _refuse)
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[:-1] == lines[:-1]  # the full path prints the same


def _text_blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(query or train line, its text lines) in order."""
    blocks: list[tuple[str, list[str]]] = []
    for ln in lines:
        if ln.startswith("  query id") or ln.startswith("      train id"):
            blocks.append((ln, []))
        elif ln.lstrip().startswith("| "):
            blocks[-1][1].append(ln)
    return blocks


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise NotLean("forced")


def test_json_holds_names_predictions_and_whole_texts(text_run, capsys) -> None:
    run, src = text_run
    top, preds = _topk(run), _predictions(run)
    qids = top["query_ids"][:3].tolist()
    got = _query_json(capsys, run, "--example", *map(str, qids), "-k", "3")
    for row, (q, entry) in enumerate(zip(qids, got["queries"])):
        y, (c, p) = src["query"]["label"][q], preds[q]
        assert {k: entry[k] for k in ("id", "label", "label_name", "predicted", "predicted_name", "text")} == \
            {"id": q, "label": y, "label_name": NAMES[y], "predicted": c, "predicted_name": NAMES[c],
             "text": src["query"]["text"][q]}
        assert entry["p_predicted"] == pytest.approx(p, rel=1e-6)
        for key in ("proponent", "opponent"):
            want = [{"id": int(i), "label": src["train"]["label"][int(i)],
                     "label_name": NAMES[src["train"]["label"][int(i)]], "text": src["train"]["text"][int(i)]}
                    for i in top[f"{key}_ids"][row]]
            assert [{k: e[k] for k in ("id", "label", "label_name", "text")} for e in entry[key + "s"]] == want
            np.testing.assert_allclose([e["score"] for e in entry[key + "s"]], top[f"{key}_scores"][row], rtol=1e-5)
    cut = _query_json(capsys, run, "--example", str(qids[0]), "-k", "1", "--chars", "25")["queries"][0]
    full = src["query"]["text"][qids[0]]
    assert (cut["text"], cut["text_omitted"]) == (full[:25] + "\u2026", len(full) - 25)


def test_html_answer_shows_names_and_whole_texts(text_run, tmp_path, capsys) -> None:
    import html

    run, src = text_run
    top, preds = _topk(run), _predictions(run)
    q, page = int(top["query_ids"][0]), tmp_path / "answer.html"
    assert main(["query", "--run", str(run), "--example", str(q), "-k", "2", "--html", str(page)]) == 0
    got, (y, (c, p)) = page.read_text(), (src["query"]["label"][q], preds[q])
    assert f"query id {q}, label {NAMES[y]} ({y}), predicted {NAMES[c]} ({c}) p {p:.2f}" in got
    for i in top["proponent_ids"][0][:2].tolist() + top["opponent_ids"][0][:2].tolist():
        assert f"id {i} label {NAMES[src['train']['label'][i]]} ({src['train']['label'][i]})" in got
        assert f'<div class="txt">{html.escape(src["train"]["text"][i])}</div>' in got
    assert f'<div class="txt">{html.escape(src["query"]["text"][q])}</div>' in got


def test_list_gives_the_stored_ids_with_names(text_run, capsys) -> None:
    run, src = text_run
    top, preds = _topk(run), _predictions(run)
    assert main(["query", "--run", str(run), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"12 query ids stored in {run}:" and lines[1].split() == ["id", "label", "predicted", "text"]
    assert [int(ln.split()[0]) for ln in lines[2:]] == top["query_ids"].tolist()
    assert np.diff(top["query_ids"]).max() > 1  # a random subset: not contiguous
    for ln, q in zip(lines[2:], top["query_ids"].tolist()):
        y, (c, p) = src["query"]["label"][q], preds[q]
        assert ln.split()[:6] == [str(q), NAMES[y], f"({y})", NAMES[c], f"({c})", "p"] and f"p {p:.2f}" in ln
    listed = _query_json(capsys, run, "--list")
    assert [r["id"] for r in listed] == top["query_ids"].tolist()
    assert [(r["label"], r["label_name"], r["text"]) for r in listed] == \
        [(src["query"]["label"][q], NAMES[src["query"]["label"][q]], src["query"]["text"][q]) for q in top["query_ids"]]
    train = _query_json(capsys, run, "--list", "--split", "train")
    assert [r["id"] for r in train] == top["train_ids"].tolist() and "predicted" not in train[0]


def test_missing_id_error_lists_the_ids_that_exist(text_run, capsys) -> None:
    run, _ = text_run
    qids = _topk(run)["query_ids"].tolist()
    missing = next(i for i in range(100) if i not in qids)
    assert main(["query", "--run", str(run), "--example", str(missing)]) == 2
    err = capsys.readouterr().err
    first = ", ".join(map(str, sorted(qids)[:10]))
    assert (f"example id(s) [{missing}] are not in the query split of this run; query ids that exist: {first}, ... "
            f"(12 in all; `tda query --run {run} --list` lists them); pick an id from that list") in err
    assert "from that range" not in err
    assert main(["query", "--run", str(run), "--example", "500", "--split", "train"]) == 2
    assert f"(60 in all; `tda query --run {run} --split train --list` lists them)" in capsys.readouterr().err
    assert main(["query", "--run", str(run)]) == 2
    assert "give --example ID (or --list" in capsys.readouterr().err


def test_config_class_names_and_text_chars_override(text_run, tmp_path, capsys, monkeypatch) -> None:
    run, src = text_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    new = ["kitten", "puppy", "parrot"]
    assert main(["run", str(src["cfg"]), "--out", str(copy), "--quiet", "--set", f"data.class_names=[{','.join(new)}]",
                 "--set", "score.text_chars=40"]) == 0  # neither key changes a stored result: all reused
    capsys.readouterr()
    q = int(_topk(copy)["query_ids"][0])
    y, text = src["query"]["label"][q], src["query"]["text"][q]
    for path in ("lean", "full"):
        if path == "full":
            monkeypatch.setattr("pipelines.cli.query.lean_answer", _refuse)
        got = _query_json(capsys, copy, "--example", str(q), "-k", "1")["queries"][0]
        assert (got["label_name"], got["text"], got["text_omitted"]) == (new[y], text[:40] + "\u2026", len(text) - 40)
        assert got["proponents"][0]["label_name"] == new[got["proponents"][0]["label"]]
        assert _query_json(capsys, copy, "--example", str(q), "-k", "1", "--chars", "all")["queries"][0]["text"] == text
    assert main(["query", "--run", str(copy), "--example", str(q), "-k", "1"]) == 0
    assert f"label {new[y]} ({y})" in capsys.readouterr().out


def test_serve_json_has_names_texts_and_the_ids_in_errors(text_run, capsys) -> None:
    from pipelines.query.serve import answer_json
    from pipelines.query.state import Service

    run, _ = text_run
    qids = _topk(run)["query_ids"].tolist()
    service = Service.load(RunPaths(run))
    assert service.path == "lean"
    served = answer_json(service.stored(qids[:2], 3))["results"]
    cli = _query_json(capsys, run, "--example", *map(str, qids[:2]), "-k", "3")["queries"]
    keys = ("id", "label", "label_name", "predicted", "predicted_name", "text")
    for s, c in zip(served, cli):
        assert {k: s[k] for k in keys} == {k: c[k] for k in keys}
        for side in ("proponents", "opponents"):
            assert [{k: e[k] for k in ("id", "label", "label_name", "text")} for e in s[side]] == \
                [{k: e[k] for k in ("id", "label", "label_name", "text")} for e in c[side]]
    with pytest.raises(QueryError, match=r"query ids that exist: " + ", ".join(map(str, sorted(qids)[:10]))):
        service.stored([max(qids) + 1000], 3)


def test_texts_too_long_to_record_and_old_records_take_the_full_path(text_run, tmp_path, capsys, monkeypatch) -> None:
    run, src = text_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    paths, q = RunPaths(copy), int(_topk(run)["query_ids"][0])
    monkeypatch.setattr("pipelines.query.lean.TEXT_BYTES_MAX", 100)
    assert write_labels(recorded_config(paths), paths)
    marker = json.loads((copy / "labels" / "labels.json").read_text())
    assert marker["texts"] == "too large" and not (copy / "labels" / "texts.npz").exists()
    with pytest.raises(NotLean, match="too long"):
        lean_answer(paths, [q], "query", 1)
    assert _query_json(capsys, copy, "--example", str(q), "-k", "1")["queries"][0]["text"] == src["query"]["text"][q]
    (copy / "labels" / "labels.json").write_text(json.dumps({k: v for k, v in marker.items()
                                                             if k not in ("texts", "class_names")}))
    with pytest.raises(NotLean, match="without class names"):  # recorded by an older version
        lean_answer(paths, [q], "query", 1)
    assert _query_json(capsys, copy, "--example", str(q), "-k", "1")["queries"][0]["label_name"] is not None


def test_lean_text_query_imports_neither_torch_nor_datasets(text_run) -> None:
    run, _ = text_run
    code = (f"import sys\nfrom pipelines.cli.main import main\nassert main(['query', '--run', {str(run)!r}, '--example', "
            f"'{int(_topk(run)['query_ids'][0])}', '-k', '2', '--json']) == 0\n"
            "print('MODULES', sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "MODULES []" and '"label_name": "' in done.stdout


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A random tiny BERT classifier (family ``hf``) whose config names its classes in ``id2label``,
    run on texts with plain integer labels; the run and the source columns."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("hf")
    words = ["good", "bad", "film", "plot", "actors", "boring", "great", "slow", "fun", "dull", "é"]
    texts = [f"review {i}: " + " ".join(words[(i * j + j) % len(words)] for j in range(3 + 23 * (i % 7)))
             for i in range(40)]
    labels = [i % 2 for i in range(40)]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(special + sorted({w for t in texts for w in t.split()}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]",
                                                model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=160, num_labels=2,
                                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    transformers.BertForSequenceClassification(config).save_pretrained(root / "bert")
    fast.save_pretrained(root / "bert")
    datasets.Dataset.from_dict({"text": texts[:30], "label": labels[:30]}).save_to_disk(str(root / "train"))
    datasets.Dataset.from_dict({"text": texts[30:], "label": labels[30:]}).to_parquet(str(root / "q.parquet"))
    (root / "cfg.yaml").write_text(
        f"model: {{hf: {root / 'bert'}, check_trained: false}}\n"
        "data: {train_path: train, query_path: q.parquet, train_size: null, query_size: 6, max_length: 150}\n"
        "featurize: {k: 32, batch_size: 8, shard_size: 16}\nscore: {topk: 3, show: 1}\n")
    assert main(["run", str(root / "cfg.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run", {"train": {"label": labels[:30], "text": texts[:30]},
                          "query": {"label": labels[30:], "text": texts[30:]}}


def test_hf_classifier_names_its_classes_from_id2label(hf_run, capsys) -> None:
    run, src = hf_run
    names, top, preds = ["negative", "positive"], _topk(run), _predictions(run)
    q = int(top["query_ids"][0])
    got = _query_json(capsys, run, "--example", str(q), "-k", "3")["queries"][0]
    y, (c, p) = src["query"]["label"][q], preds[q]
    assert {k: got[k] for k in ("label", "label_name", "predicted", "predicted_name", "text")} == \
        {"label": y, "label_name": names[y], "predicted": c, "predicted_name": names[c],
         "text": src["query"]["text"][q]}
    assert got["p_predicted"] == pytest.approx(p, rel=1e-6)
    assert [(e["id"], e["label_name"], e["text"]) for e in got["proponents"]] == \
        [(int(i), names[src["train"]["label"][int(i)]], src["train"]["text"][int(i)]) for i in top["proponent_ids"][0]]
    assert main(["query", "--run", str(run), "--example", str(q), "-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"  query id {q}  label {names[y]} ({y})  predicted {names[c]} ({c}) "
                                              f"p {p:.2f}\n")
