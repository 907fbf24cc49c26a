"""The files of the Hugging Face family config ``benchmarks/families/hf_bert.yaml``, made offline.

A tiny random-init BERT classifier (2 layers, 64 wide, 2 heads, dropout 0) with a WordPiece
vocabulary trained here on the AG News training rows, fine-tuned on AG News by tda's generic
recipe (:class:`tda.workflows.recipe.TrainRecipe`, the one ``tda validate`` retrains with), one
model per seed. Nothing is downloaded: the texts come from ``/work/shared/data/agnews-subset``
(``--data`` or ``TDA_SHARED_DATA``), the tokenizer is trained on them, the model is a seeded
``BertForSequenceClassification(config)``. Written under ``~/.cache/tda/hf-bert-agnews``,
the paths the config names:

- ``base/``: ``save_pretrained`` folder (config, random weights, tokenizer): what fine-tuning
  starts from (``train.init: auto`` is ``pretrained`` for Hugging Face models);
- ``data/train.parquet`` (the 10,001 training rows; the config draws ``data.train_size``),
  ``data/test.parquet`` (the 7,600 test rows; ``data.query_size`` drawn), integer ``label`` with
  the class names as a ``ClassLabel``;
- ``ckpts/``: the fine-tuned weights of seeds ``train.seed + i``, ``i < train.models``, trained
  on the config's training rows with the config's recipe, with their ``tda-checkpoints.json``.

Each part is rebuilt only when what it depends on changed (a fingerprint file beside it).

    python benchmarks/hf_bert_family.py        # prepare (benchmarks/projections.py calls it)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "families" / "hf_bert.yaml"
CACHE = Path.home() / ".cache" / "tda" / "hf-bert-agnews"
DATA = Path(os.environ.get("TDA_SHARED_DATA", "/work/shared/data"))
CLASSES = ["World", "Sports", "Business", "Sci/Tech"]  # AG News's class order
VOCAB = 4000
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _rows(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise SystemExit(f"{path} not found: the shared AG News subset (set --data or TDA_SHARED_DATA)")
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.append(row[0].replace("\\", " "))
            labels.append(CLASSES.index(row[1]))
    return texts, labels


def _stamp(folder: Path, key: dict) -> bool:
    """Whether ``folder`` was built from ``key`` (its ``.built.json``)."""
    f = folder / ".built.json"
    return f.is_file() and json.loads(f.read_text()) == key


def prepare_data(cache: Path, data: Path) -> None:
    import datasets

    out = cache / "data"
    key = {"source": str(data / "agnews-subset"), "classes": CLASSES}
    if _stamp(out, key):
        return
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=CLASSES)})
    for name, file in (("train", "train_subset_10001.tsv"), ("test", "test.tsv")):
        texts, labels = _rows(data / "agnews-subset" / file)
        datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features).to_parquet(
            str(out / f"{name}.parquet"))
    (out / ".built.json").write_text(json.dumps(key))


def prepare_model(cache: Path, data: Path) -> None:
    """``base/``: a WordPiece tokenizer trained on the training texts and a seeded random BERT."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out = cache / "base"
    key = {"vocab": VOCAB, "model": MODEL, "classes": CLASSES, "seed": 0}
    if _stamp(out, key):
        return
    texts, _ = _rows(data / "agnews-subset" / "train_subset_10001.tsv")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIAL))
    ids = {s: tok.token_to_id(s) for s in SPECIAL}
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                                model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), pad_token_id=ids["[PAD]"], num_labels=len(CLASSES),
                                     id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
                                     **MODEL)
    out.mkdir(parents=True, exist_ok=True)
    transformers.BertForSequenceClassification(config).save_pretrained(out)
    fast.save_pretrained(out)
    (out / ".built.json").write_text(json.dumps(key))


def prepare_checkpoints(cache: Path, config: Path = CONFIG) -> None:
    """``ckpts/``: the recipe ``tda validate`` retrains with, on the whole training set, seeds
    ``train.seed + i``, recorded by :class:`tda.CheckpointRecorder`; query accuracy printed."""
    import shutil

    import torch

    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.families import family_for
    from pipelines.families.capabilities import resolve_recipe
    from pipelines.families.jobs import job_data
    from pipelines.ground_truth import job_fingerprint
    from tda.models.recording import CheckpointRecorder

    cfg = load_config(config, ["model.checkpoints=null"])
    out = cache / "ckpts"
    key = {"job": job_fingerprint(cfg), "seed": cfg.train.seed, "models": cfg.train.models}
    if _stamp(out, key):
        return
    shutil.rmtree(out, ignore_errors=True)  # another recipe: the recorder refuses a folder of two
    family = family_for(cfg)
    task = family.task(cfg)
    recipe, _ = resolve_recipe(cfg)
    train, _, query, _ = job_data(cfg, "query")
    n = len(train["labels"])
    steps = recipe.steps(n)
    recorded = {k: v for k, v in recipe.to_dict().items() if k != "seed"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ground truth's retrainings (several threads are slower on small batches here)
    for i in range(cfg.train.models):
        start = time.time()
        model = replace(recipe, seed=cfg.train.seed + i).train(lambda: family.fresh_model(cfg), train, task)
        with torch.no_grad():
            inputs = {k: query[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in query}
            acc = float((model(**inputs).logits.argmax(-1) == query["labels"]).float().mean())
        last_lr = recipe.lr * recipe.lr_factor(steps - 1, steps, recipe.epochs - 1)
        CheckpointRecorder(out, recorded, model_index=i).save(model, step=steps, epoch=recipe.epochs, lr=last_lr)
        print(f"hf_bert: fine-tuned model {i} ({recipe.epochs} epochs, {n} rows) in {time.time() - start:.0f} s, "
              f"query accuracy {acc:.3f}", flush=True)
    torch.set_num_threads(threads)
    (out / ".built.json").write_text(json.dumps(key))


def prepare(cache: Path = CACHE, data: Path = DATA, config: Path = CONFIG) -> None:
    prepare_data(cache, data)
    prepare_model(cache, data)
    prepare_checkpoints(cache, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data folder (holds agnews-subset/)")
    args = ap.parse_args()
    prepare(CACHE, args.data)


if __name__ == "__main__":
    main()
