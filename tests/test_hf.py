"""Hugging Face transformers models: tiny random BERT / GPT-2 classifiers and a GPT-2 LM, saved
with save_pretrained and reloaded offline, give per-example gradients equal to a float64 loop
over single unpadded examples (vmap where the model's code allows, the autograd loop where it
does not, logged), whatever the padding; checkpoints load from .safetensors and folders with
errors naming the differences; the Attributor runs end to end on the tiny BERT."""

from __future__ import annotations

import copy
import csv
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import tda  # noqa: E402
from tda.errors import CheckpointError, ConfigError, ShapeError  # noqa: E402
from tda.featurizers.factored import FactoredFeaturizer  # noqa: E402
from tda.featurizers.gradient import Featurizer, apply_checkpoint, load_checkpoint  # noqa: E402
from tda.gradients.per_example import loss_weights  # noqa: E402
from tda.models.hf import (HFCausalLMCollate, HFCausalLMTask, HFClassificationTask, HFTextCollate,  # noqa: E402
                    load_gpt2_tokenizer, load_hf_model, load_hf_tokenizer, trim_padding)
from tda.models.lm import completion_log_prob  # noqa: E402
from tda.models.tasks import ClassificationTask, classification_margin  # noqa: E402

DATA = Path(__file__).parents[1].parent / "shared" / "data"
GPT2_TOKENIZER = DATA / "gpt2-tokenizer"
SMALL = dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (the shared data folder ../shared/data is missing)")
    return path


@pytest.fixture(scope="module")
def sst2() -> list[tuple[str, int]]:
    with open(_need(DATA / "sst2-glue" / "train.tsv"), encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:41]
    return [(text, int(label)) for label, text in rows]


@pytest.fixture(scope="module")
def stories() -> list[tuple[str, str]]:
    lines = _need(DATA / "tinystories-sample" / "tinystories_train_head_944KB.txt").read_text(encoding="utf-8")
    words = [line.split() for line in lines.splitlines() if len(line.split()) > 12][:6]
    return [(" ".join(w[:4 + i]), " " + " ".join(w[4 + i: 7 + 2 * i])) for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, sst2) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for text, _ in sst2 for w in text.split()})
    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]",
                                                model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _gpt2_folder(tmp_path_factory, cls, name: str, **extra) -> Path:
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, **SMALL, **extra)
    folder = tmp_path_factory.mktemp(name)
    cls(config).save_pretrained(folder)
    load_gpt2_tokenizer(_need(GPT2_TOKENIZER)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_cls_folder(tmp_path_factory) -> Path:
    return _gpt2_folder(tmp_path_factory, transformers.GPT2ForSequenceClassification, "gpt2cls", num_labels=2,
                        pad_token_id=50256)


@pytest.fixture(scope="module")
def gpt2_lm_folder(tmp_path_factory) -> Path:
    return _gpt2_folder(tmp_path_factory, transformers.GPT2LMHeadModel, "gpt2lm")


def _cols(rows: list[tuple], names: tuple[str, str]) -> dict[str, np.ndarray]:
    return {n: np.asarray([r[j] for r in rows], dtype=object) for j, n in enumerate(names)}


def _reference(model: nn.Module, collate, rows: list[tuple], names_cols: tuple[str, str], params: list[str],
               lm: bool = False) -> torch.Tensor:
    """(B, d) float64 gradients of f for each example alone, unpadded, with plain torch.autograd."""
    m64 = copy.deepcopy(model).double().eval()
    chosen = [dict(m64.named_parameters())[n] for n in params]
    out = []
    for row in rows:
        b = collate(_cols([row], names_cols))
        assert bool(b["attention_mask"].all())  # a single row has no padding
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
        logits = m64(**inputs).logits
        f = completion_log_prob(logits, b["input_ids"], b["loss_mask"]) if lm else classification_margin(
            logits, b["labels"])
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f.sum(), chosen)]))
    return torch.stack(out)


def _close(flat: torch.Tensor, ref: torch.Tensor) -> None:
    assert flat.shape == ref.shape
    torch.testing.assert_close(flat.double(), ref, rtol=2e-4, atol=2e-5 * float(ref.abs().max()))


def test_bert_vmap_matches_float64_loop(bert_folder, sst2, caplog) -> None:
    model, collate = load_hf_model(bert_folder), HFTextCollate(bert_folder)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    rows = sst2[:6]
    batch = collate(_cols(rows, ("text", "label")))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(v.dtype == torch.int64 for v in batch.values()) and not bool(batch["attention_mask"].all())
    fz = Featurizer(model, HFClassificationTask(), k=8)
    with caplog.at_level(logging.INFO, logger="tda.featurizers.gradient"):
        flat = fz.gradients(batch)
    assert fz.grad_method == "vmap" and "grad_method 'vmap'" in caplog.text
    _close(flat, _reference(model, collate, rows, ("text", "label"), fz.names))
    assert fz.spec()["task"] == "hf-classification-margin" != ClassificationTask.name


def test_gpt2_classifier_falls_back_to_loop_and_logs_it(gpt2_cls_folder, sst2, caplog) -> None:
    model, collate = load_hf_model(gpt2_cls_folder), HFTextCollate(gpt2_cls_folder)
    rows, params = sst2[:4], ["transformer.h.1", "score"]
    batch = collate(_cols(rows, ("text", "label")))
    assert "token_type_ids" not in batch  # GPT-2 would add an embedding for them
    ref = _reference(model, collate, rows, ("text", "label"), Featurizer(model, HFClassificationTask(), k=8,
                                                                          param_names=params).names)
    fz = Featurizer(model, HFClassificationTask(), k=8, param_names=params)
    with caplog.at_level(logging.INFO, logger="tda.featurizers.gradient"):
        flat = fz.gradients(batch)
    assert fz.grad_method == "loop" and "cannot run under vmap" in caplog.text and "grad_method 'loop'" in caplog.text
    _close(flat, ref)
    with pytest.raises(ConfigError, match="cannot run under torch.func.vmap") as info:  # forced vmap: the right hint
        list(Featurizer(model, HFClassificationTask(), k=8, param_names=params, grad_method="vmap").featurize(
            model.state_dict(), 0, [(np.arange(4), batch)]))
    assert "shape the model expects" not in str(info.value)
    model.config.pad_token_id = None  # no padding check: last token of the trimmed example, under vmap
    fz = Featurizer(model, HFClassificationTask(), k=8, param_names=params)
    _close(fz.gradients(batch), ref)
    assert fz.grad_method == "vmap"


def test_gpt2_lm_completion_log_prob_matches_float64_loop(gpt2_lm_folder, stories) -> None:
    model, collate = load_hf_model(gpt2_lm_folder), HFCausalLMCollate(gpt2_lm_folder)
    batch = collate(_cols(stories, ("prompt", "completion")))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    first = collate(_cols(stories[:1], ("prompt", "completion")))
    tok = load_hf_tokenizer(gpt2_lm_folder)
    assert tok.decode(first["input_ids"][0][first["loss_mask"][0] == 1]) == stories[0][1]
    fz = Featurizer(model, HFCausalLMTask(), k=8, param_names=["transformer.h"])
    flat = fz.gradients(batch)
    assert fz.grad_method == "vmap" and fz.spec()["task"] == "hf-causal-lm-logprob-sum"
    _close(flat, _reference(model, collate, stories, ("prompt", "completion"), fz.names, lm=True))


@pytest.mark.parametrize("which", ["bert", "gpt2_cls", "gpt2_lm"])
def test_padding_does_not_change_gradients_or_features(which, request, sst2, stories) -> None:
    folder = request.getfixturevalue(f"{which}_folder")
    lm = which == "gpt2_lm"
    collate = (HFCausalLMCollate if lm else HFTextCollate)(folder)
    rows, cols = (stories, ("prompt", "completion")) if lm else (sst2, ("text", "label"))
    short, long = min(rows[:8], key=lambda r: len(r[0])), max(rows[:8], key=lambda r: len(r[0]))
    model, task = load_hf_model(folder), HFCausalLMTask() if lm else HFClassificationTask()
    alone, padded = collate(_cols([short], cols)), collate(_cols([short, long], cols))
    padded_more = collate(_cols([long, short, long], cols))
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    fz = Featurizer(model, task, k=8, param_names=None if which == "bert" else ["transformer.h.0"])
    g = fz.gradients(alone)[0]
    torch.testing.assert_close(fz.gradients(padded)[0], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    torch.testing.assert_close(fz.gradients(padded_more)[1], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    q = loss_weights(model, task, padded_more)
    torch.testing.assert_close(q[1], loss_weights(model, task, alone)[0])
    layers = {"bert": None, "gpt2_cls": ["transformer.h.0", "score"], "gpt2_lm": ["transformer.h.0"]}[which]
    ff = FactoredFeaturizer(model, task, k_in=4, k_out=4, layers=layers)
    one, two = ff.featurize_batch(alone, [0], 0)[0], ff.featurize_batch(padded, [0, 1], 0)[0]
    np.testing.assert_allclose(two[0], one[0], rtol=1e-4, atol=1e-5 * float(np.abs(one).max()))


def test_trim_padding_groups_by_span() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]])
    batch = {"input_ids": torch.arange(20).reshape(5, 4), "attention_mask": mask, "labels": torch.arange(5)}
    groups = trim_padding(batch)
    assert sorted(int(i) for rows, _ in groups for i in rows) == [0, 1, 2, 3, 4]
    by_first = {int(rows[0]): sub for rows, sub in groups}
    assert by_first[0]["input_ids"].tolist() == [[0, 1], [12, 13]] and "attention_mask" not in by_first[0]
    assert by_first[2]["input_ids"].tolist() == [[9, 10]] and by_first[2]["labels"].tolist() == [2]
    assert by_first[4]["attention_mask"].tolist() == [[1, 0, 1, 0]]  # holes: kept whole, with its mask


class _ItemNet(nn.Module):
    """A classifier whose forward calls .item() (legal eagerly, refused by vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.lin(x)) * (2.0 if x.sum().item() > 0 else 1.0)


def test_vmap_refusal_falls_back_while_wrong_shapes_keep_their_hint(make_mlp, tiny_data, caplog) -> None:
    x, y = tiny_data(4, in_dim=5, classes=3, seed=3)
    torch.manual_seed(0)
    net = _ItemNet().eval()
    fz = Featurizer(net, ClassificationTask(), k=8)
    with caplog.at_level(logging.WARNING, logger="tda.featurizers.gradient"):
        flat = fz.gradients({"x": x, "y": y})
    assert fz.grad_method == "loop" and "using one autograd pass per example" in caplog.text
    n64 = copy.deepcopy(net).double()
    ref = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        classification_margin(n64(x[i: i + 1].double()), y[i: i + 1]).sum(), list(n64.parameters()))])
        for i in range(4)])
    torch.testing.assert_close(flat.double(), ref, rtol=1e-5, atol=1e-6)
    mlp = make_mlp(in_dim=5)
    for method in ("auto", "loop"):
        with pytest.raises(ShapeError, match="make collate return inputs of the shape the model expects"):
            list(Featurizer(mlp, ClassificationTask(), k=8, grad_method=method).featurize(
                mlp.state_dict(), 0, [(np.arange(4), {"x": torch.randn(4, 6), "y": y})]))


def test_plain_classification_task_on_hf_model_names_the_fix(bert_folder, sst2) -> None:
    batch = HFTextCollate(bert_folder)(_cols(sst2[:2], ("text", "label")))
    with pytest.raises(ShapeError, match="use tda.models.hf.HFClassificationTask"):
        ClassificationTask(input_key="input_ids", label_key="labels").output(load_hf_model(bert_folder), batch)


def test_safetensors_and_folder_checkpoints_with_tied_head(gpt2_lm_folder, tmp_path) -> None:
    from safetensors.torch import save_file

    model = load_hf_model(gpt2_lm_folder)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tie implies it
    state["transformer.h.0.ln_1.weight"] += 1.0
    save_file(state, tmp_path / "ckpt.safetensors")
    other = load_hf_model(gpt2_lm_folder)
    apply_checkpoint(other, load_checkpoint(tmp_path / "ckpt.safetensors"))
    assert torch.equal(other.transformer.h[0].ln_1.weight, state["transformer.h.0.ln_1.weight"])
    assert other.lm_head.weight is other.transformer.wte.weight
    from_folder = load_checkpoint(gpt2_lm_folder)
    apply_checkpoint(other, from_folder)
    assert torch.equal(other.transformer.h[0].ln_1.weight, model.transformer.h[0].ln_1.weight)
    untied = dict(from_folder, **{"lm_head.weight": from_folder["transformer.wte.weight"] + 1})
    with pytest.raises(CheckpointError, match=r"tied weights that differ \['lm_head.weight != transformer.wte"):
        apply_checkpoint(other, untied)


def test_wrong_checkpoints_and_folders_name_the_differences(bert_folder, gpt2_lm_folder, tmp_path) -> None:
    from safetensors.torch import save_file

    model = load_hf_model(bert_folder)
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    bad["bert.pooler.dense.weight"] = torch.zeros(3, 32)
    bad["head.weight"] = torch.zeros(2)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['classifier.weight', 'classifier.bias'\], unexpected "
                                              r"\['head.weight'\], shape mismatches \['bert.pooler.dense.weight: "
                                              r"\(3, 32\) vs model \(32, 32\)'\]"):
        apply_checkpoint(model, load_checkpoint(tmp_path / "bad.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a transformers model class"):
        load_hf_model(bert_folder, "BertForSentiment")
    with pytest.raises(ConfigError, match="needs a BertConfig, but .* holds a GPT2Config"):
        load_hf_model(gpt2_lm_folder, "BertForSequenceClassification")
    with pytest.raises(CheckpointError, match=r"score.weight.*\['GPT2LMHeadModel'\]"):
        load_hf_model(gpt2_lm_folder, "GPT2ForSequenceClassification")


def test_tokenizers_and_collates_pickle(gpt2_cls_folder, sst2) -> None:
    tok = load_hf_tokenizer(_need(GPT2_TOKENIZER))
    assert tok("Hello world")["input_ids"] == [15496, 995] and tok.pad_token == "<|endoftext|>"
    cols = _cols(sst2[:3], ("text", "label"))
    for collate in (HFTextCollate(gpt2_cls_folder), HFTextCollate(tok)):
        again = pickle.loads(pickle.dumps(collate))
        a, b = collate(cols), again(cols)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        load_hf_tokenizer(DATA / "sst2-glue")


def test_attributor_end_to_end_on_tiny_bert(bert_folder, sst2, tmp_path) -> None:
    import datasets
    from safetensors.torch import save_file

    model = load_hf_model(bert_folder)
    moved = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(moved, tmp_path / "step.safetensors")
    data = datasets.Dataset.from_dict({"text": [t for t, _ in sst2[:20]], "label": [y for _, y in sst2[:20]]})
    train, query = data.select(range(16)), data.select(range(16, 20))
    def attributor(**kw):
        return tda.Attributor(model, [bert_folder, tmp_path / "step.safetensors"], collate=HFTextCollate(bert_folder),
                              k=32, batch_size=8, **kw)  # task=None: the HF classification task for this model

    attr = attributor()
    assert attr.featurizer.task.name == "hf-classification-margin"
    scores = attr.fit(train).scores(query)
    assert scores.shape == (4, 16) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # the default: tensorsketch covers BERT (linear layers, embeddings, LayerNorms), checked on a batch
    assert attr.projection == "tensorsketch", attr.projection_reason
    explicit = attributor(projection="tensorsketch").fit(train).scores(query)
    np.testing.assert_allclose(scores, explicit, rtol=1e-4, atol=1e-5 * np.abs(explicit).max())
    sparse = attributor(projection="sparse")
    assert sparse.fit(train).scores(query).shape == (4, 16) and sparse.featurizer.grad_method == "vmap"
