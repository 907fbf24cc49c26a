"""Causal LM task: output function against a hand-computed float64 log-probability, gradient
sign, data helpers, and TRAK / TracIn attribution on a tiny trained character-level GPT-2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pipelines.families.chargpt import (CharVocab, GPTSpec, build_gpt2, completion_examples,  # noqa: E402
                                        dataset_tokens, lm_loss, lm_sequences, load_text, train_lm)
from tda.api import Attributor  # noqa: E402
from tda.data.loading import arrow_columns, iter_batches  # noqa: E402
from tda.errors import ConfigError, DataError, ShapeError  # noqa: E402
from tda.gradients.per_example import flatten_grads, per_example_grads  # noqa: E402
from tda.models.lm import LMTask, completion_log_prob, lm_collate  # noqa: E402
from tda.scorers import TracInCPScorer, TRAKScorer  # noqa: E402

TEXT = (
    "the cat sat on the mat. a dog ran to the park! we sing songs at noon; "
    "my red fox jumps over logs. you bake bread with salt and oil? her bird can fly high. "
    "old men fish by the quiet river. kids play chess in the warm hall. rain falls on green hills. "
    "ships sail east at dawn, bells ring out. "
) * 2
SEQ = 24


@pytest.fixture(scope="module")
def vocab() -> CharVocab:
    return CharVocab.from_text(TEXT)


@pytest.fixture(scope="module")
def tiny_spec(vocab) -> GPTSpec:
    return GPTSpec(vocab_size=vocab.size, seq_len=SEQ, n_layer=1, n_head=2, n_embd=16)


def _batch(vocab: CharVocab, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    ds = completion_examples(vocab, pairs, SEQ)
    return lm_collate(arrow_columns(ds.with_format("arrow")[:]))


PAIRS = [("the cat ", "sat on"), ("a dog ran", " to the park"), ("we", " sing songs")]


def test_vocab_round_trip_and_unknown_characters(vocab) -> None:
    ids = vocab.encode("the cat")
    assert ids.dtype == np.int64 and vocab.decode(ids) == "the cat"
    assert CharVocab.from_json(vocab.to_json()) == vocab
    with pytest.raises(DataError, match="not in the vocabulary"):
        vocab.encode("THE CAT")


def test_sequences_and_completions_layout(vocab) -> None:
    ds = lm_sequences(TEXT, vocab, SEQ, n=5, stride=10)
    cols = arrow_columns(ds.with_format("arrow")[:])
    assert list(cols["id"]) == [0, 1, 2, 3, 4]
    assert vocab.decode(cols["input_ids"][2]) == TEXT[20: 20 + SEQ]
    assert cols["loss_mask"][:, 0].sum() == 0 and cols["loss_mask"][:, 1:].all()
    batch = _batch(vocab, [("the cat ", "sat"), ("long prompt " * 4, "dog")])
    assert batch["input_ids"].shape == (2, SEQ) and batch["loss_mask"].dtype == torch.float32
    assert vocab.decode(batch["input_ids"][0, :11]) == "the cat sat"
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == [8, 9, 10]
    # a prompt too long for the context keeps its last characters
    assert batch["loss_mask"][1].nonzero().flatten().tolist() == [SEQ - 3, SEQ - 2, SEQ - 1]
    assert vocab.decode(batch["input_ids"][1, SEQ - 3:]) == "dog"
    with pytest.raises(DataError, match="completion"):
        completion_examples(vocab, [("the", "")], SEQ)
    with pytest.raises(DataError, match="holds"):
        lm_sequences(TEXT, vocab, SEQ, n=10_000)


def test_output_equals_hand_computed_log_prob_float64(vocab, tiny_spec) -> None:
    model = build_gpt2(tiny_spec, seed=0).double()
    batch = _batch(vocab, PAIRS)
    got = LMTask("sum").output(model, batch)
    got_mean = LMTask("mean").output(model, batch)
    for row, (prompt, completion) in enumerate(PAIRS):
        seq = torch.from_numpy(vocab.encode(prompt + completion))
        ref = torch.zeros((), dtype=torch.float64)
        for t in range(len(prompt), len(seq)):  # log p(x_t | x_<t) from a prefix-only forward
            with torch.no_grad():
                logits = model(seq[None, :t]).logits[0, -1]
            ref += torch.log_softmax(logits, dim=-1)[seq[t]]
        torch.testing.assert_close(got[row], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_mean[row], ref / len(completion), rtol=1e-12, atol=1e-12)
    assert (got < 0).all()  # a log-probability


def test_task_rejects_bad_input(vocab) -> None:
    with pytest.raises(ConfigError, match="reduction"):
        LMTask("median")
    with pytest.raises(ShapeError, match="input_ids"):
        LMTask().output(lambda x: x, {"x": torch.zeros(2, 3)})
    with pytest.raises(ShapeError, match="logits"):
        completion_log_prob(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5))


def test_per_example_gradients_finite_and_step_raises_f(vocab, tiny_spec) -> None:
    model = build_gpt2(tiny_spec, seed=1).double()
    task = LMTask()
    batch = _batch(vocab, PAIRS)
    names = [n for n, _ in model.named_parameters()]
    grads = per_example_grads(model, task, batch)
    flat = flatten_grads(grads, names)  # (B, d)
    assert flat.dtype == torch.float64 and torch.isfinite(flat).all() and (flat.norm(dim=1) > 0).all()
    base = task.output(model, batch).detach()
    params = dict(model.named_parameters())
    for row in range(len(PAIRS)):
        # vmap gradient == autograd gradient of this example alone
        one = {k: v[row: row + 1] for k, v in batch.items()}
        ref = torch.autograd.grad(task.output(model, one).sum(), [params[n] for n in names])
        torch.testing.assert_close(flat[row], torch.cat([g.reshape(-1) for g in ref]))
        # a small step along the gradient raises f (the documented sign)
        step = 1e-3 / flat[row].norm()
        with torch.no_grad():
            for n in names:
                params[n] += step * grads[n][row]
            moved = task.output(model, one)[0]
            for n in names:
                params[n] -= step * grads[n][row]
        assert moved > base[row]


@pytest.fixture(scope="module")
def trained(vocab, tiny_spec):
    """A tiny LM trained on 30 sequences with three checkpoints (a few seconds)."""
    torch.set_num_threads(1)
    train = lm_sequences(TEXT, vocab, SEQ, n=30, stride=13)
    model = build_gpt2(tiny_spec, seed=0)
    ckpts = []

    def save(index, m, record):
        ckpts.append({k: v.detach().clone() for k, v in m.state_dict().items()})

    tokens = dataset_tokens(train)
    before = lm_loss(model, tokens)
    result = train_lm(model, tokens, steps=120, lr=1e-2, batch_size=16, seed=0, warmup=10,
                      checkpoint_every=40, on_checkpoint=save)
    return {"train": train, "model": model, "ckpts": ckpts, "result": result, "before": before,
            "after": lm_loss(model, tokens)}


def test_training_records_checkpoints_and_learns(trained) -> None:
    res = trained["result"]
    assert [c["step"] for c in res.checkpoints] == [40, 80, 120] and len(trained["ckpts"]) == 3
    assert all(c["lr"] > 0 for c in res.checkpoints)
    assert trained["after"] < trained["before"] - 0.5


@pytest.mark.parametrize("scorer_name", ["trak", "tracin"])
def test_duplicate_of_a_training_sequence_is_its_top_proponent(trained, vocab, scorer_name) -> None:
    train = trained["train"]
    cols = arrow_columns(train.with_format("arrow")[:])
    picks = [3, 11, 24]
    pairs = []
    for i in picks:  # the query is training sequence i split into a prompt and a completion
        text = vocab.decode(cols["input_ids"][i])
        pairs.append((text[:8], text[8:]))
    queries = completion_examples(vocab, pairs, SEQ)
    ckpts = trained["ckpts"]
    if scorer_name == "trak":
        # a light ridge: the LDS-tuned "auto" default is heavier, which favours high-gradient sequences
        # over an exact duplicate (noted in issue 12)
        scorer, used = TRAKScorer(lambda_rel=0.01), ckpts[-1:]
    else:
        scorer, used = TracInCPScorer([c["lr"] for c in trained["result"].checkpoints]), ckpts
    attr = Attributor(trained["model"], used, collate=lm_collate, task=LMTask(), scorer=scorer,
                      k=512, batch_size=16)
    attr.fit(train)
    scores = attr.scores(queries)
    assert scores.shape == (3, len(train)) and np.isfinite(scores).all()
    top = attr.top_k(queries, k=3)
    assert top.proponent_ids[:, 0].tolist() == picks
    assert (top.proponent_scores[:, 0] > 0).all()


def test_iter_batches_yields_dataset_ids(vocab) -> None:
    ds = completion_examples(vocab, PAIRS, SEQ, ids=[7, 8, 9])
    ids, batch = next(iter_batches(ds, lm_collate, 8))
    assert ids.tolist() == [7, 8, 9] and batch["input_ids"].shape == (3, SEQ)


def test_load_text_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")


@pytest.mark.parametrize("projection", ["dense", "factored"])
def test_pipeline_run_on_a_tiny_corpus(tmp_path, capsys, projection) -> None:
    """`tda run` with the causal-lm family: self-queries find their own training sequence."""
    import yaml

    from pipelines.cli.main import main

    words = TEXT.replace(".", "").replace("!", "").replace("?", "").replace(";", "").replace(",", "").split()
    corpus = " ".join(np.random.default_rng(0).choice(sorted(set(words)), size=300)) + "."
    (tmp_path / "input.txt").write_text(corpus)  # seeded random words: no repeated passages
    cfg = {
        "name": "tiny-lm", "out_dir": str(tmp_path / "run"),
        "data": {"name": "text", "root": str(tmp_path), "train_size": 30, "query_split": "train",
                 "query_size": 3},
        "model": {"family": "causal-lm", "arch": "gpt2",
                  "options": {"context": SEQ, "n_layer": 1, "n_head": 2, "n_embd": 16, "prompt_len": 8,
                              "test_start": 0.7, "queries": [["the cat ", "sat on"]],
                              "saved_checkpoints": 2}},
        "train": {"models": 1, "epochs": 8, "lr": 1e-2, "batch_size": 16, "checkpoints": "all"},
        "featurize": {"k": 256, "batch_size": 16, "shard_size": 16, "projection": projection, "k_in": 8,
                      "k_out": 8},
        "score": {"scorer": "tracin", "topk": 3, "show": 2},
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "char GPT-2" in out and "completion 'sat on'" in out and "proponents (raise f)" in out
    with np.load(tmp_path / "run" / "scores" / "topk.npz") as z:
        assert z["query_ids"].tolist() == [0, 1, 2, 3] and np.isfinite(z["proponent_scores"]).all()
        assert z["proponent_ids"][1:, 0].tolist() == [0, 1, 2]  # queries 1..3 are training sequences 0..2
    ckpts = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    assert [c["epoch"] for c in ckpts] == [3, 7] and all(c["lr"] > 0 for c in ckpts)
    spec = json.loads((tmp_path / "run" / "features-train" / "manifest.json").read_text())["spec"]
    if projection == "dense":  # the LM family validates: its retraining job and every gradient scorer
        assert main(["validate", str(path), "--quiet", "--set", "validate.subsets=4", "--set", "validate.plots=false"]) == 0
        res = json.loads((tmp_path / "run" / "validation" / "validation.json").read_text())
        assert res["n_queries"] == 4 and {"tracin", "trak", "graddot", "gradcos"} <= set(res["scorers"])
        assert main(["validate", str(path), "--quiet", "--set", "validate.subsets=3", "--set", "validate.plots=false",
                     "--set", "validate.protocol=small-drop", "--set", "validate.drop_fraction=0.1", "--set",
                     f"validate.ground_truth_dir={tmp_path / 'gt-small'}"]) == 0
        res = json.loads((tmp_path / "run" / "validation" / "validation.json").read_text())
        assert res["ground_truth"]["batch_order"] == "fixed"  # zero data weights: the run's own batches
    if projection == "factored":  # 4 linear layers + lm_head, 8 x 8 each; embeddings and norms listed as skipped
        assert spec["k"] == 5 * 64 and "transformer.wte.weight" in spec["skipped"]
