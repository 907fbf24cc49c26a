"""Hugging Face models through ``tda run`` and ``tda query`` from configs: a tiny random BERT
classifier on SST-2 rows and a tiny GPT-2 LM on TinyStories lines (folders from test_hf's fixtures)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

pytest.importorskip("transformers")

from test_hf import bert_folder, gpt2_lm_folder, sst2, stories  # noqa: E402,F401  (fixtures)

from pipelines.cli.main import main  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.families import family_for  # noqa: E402


def _run_and_query(tmp_path, cfg_text: str, monkeypatch, capsys) -> tuple[np.ndarray, str]:
    (tmp_path / "cfg.yaml").write_text(cfg_text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(tmp_path / "cfg.yaml"), "--out", "run", "--quiet"]) == 0
    capsys.readouterr()
    scores = np.load(elsewhere / "run" / "scores" / "scores.npy")
    with np.load(elsewhere / "run" / "scores" / "topk.npz") as z:
        qid, best = int(z["query_ids"][0]), int(z["proponent_ids"][0][0])
    monkeypatch.chdir(tmp_path)
    assert main(["query", "--run", str(elsewhere / "run"), "--example", str(qid), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"query id {qid}" in out and f"train id {best:>6}" in out
    return scores, out


def test_tiny_bert_classifier_runs_from_a_config(bert_folder, sst2, tmp_path, monkeypatch, capsys) -> None:
    rows = {"text": [t for t, _ in sst2], "label": [y for _, y in sst2]}
    datasets.Dataset.from_dict({k: v[:30] for k, v in rows.items()}).save_to_disk(str(tmp_path / "train"))
    datasets.Dataset.from_dict({k: v[30:] for k, v in rows.items()}).to_parquet(str(tmp_path / "test.parquet"))
    cfg = (f"model: {{hf: {bert_folder}, check_trained: false}}\n"  # a random tiny BERT
           "data: {train_path: train, query_path: test.parquet, train_size: null, query_size: 6}\n"
           "featurize: {k: 32, batch_size: 8, shard_size: 16}\nscore: {topk: 3, show: 1}\n")
    scores, _ = _run_and_query(tmp_path, cfg, monkeypatch, capsys)
    assert scores.shape == (6, 30) and np.isfinite(scores).all() and scores.std() > 0
    parsed = load_config(tmp_path / "cfg.yaml")
    assert parsed.model.family == "hf" and type(family_for(parsed).task(parsed)).__name__ == "HFClassificationTask"


def test_tiny_gpt2_lm_runs_from_a_config(gpt2_lm_folder, stories, tmp_path, monkeypatch, capsys) -> None:
    texts = [p + c for p, c in stories]
    datasets.Dataset.from_dict({"text": texts * 2}).to_json(str(tmp_path / "train.jsonl"))
    datasets.Dataset.from_dict({"prompt": [p for p, _ in stories[:3]],
                                "completion": [c for _, c in stories[:3]]}).to_parquet(str(tmp_path / "q.parquet"))
    cfg = (f"model: {{hf: {gpt2_lm_folder}, check_trained: false}}\n"  # a random tiny GPT-2
           "data: {train_path: train.jsonl, query_path: q.parquet, train_size: null, max_length: 32}\n"
           "featurize: {k: 32, batch_size: 4, shard_size: 8, params: [transformer.h]}\nscore: {topk: 3, show: 1}\n")
    scores, _ = _run_and_query(tmp_path, cfg, monkeypatch, capsys)
    assert scores.shape == (3, 12) and np.isfinite(scores).all()
    # a training text that contains the query's prompt and completion is among its top proponents
    assert int(np.argmax(scores[0])) in (0, 6)
