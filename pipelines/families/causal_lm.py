"""The ``causal-lm`` model family: a character-level GPT-2 on a text corpus (:mod:`pipelines.families.chargpt`).

Data: the corpus file (``data.root``: the file, or a folder holding ``input.txt``; default Tiny
Shakespeare, shipped with tda) is split at ``model.options.test_start`` (a fraction of its characters). Training
examples are the first ``data.train_size`` non-overlapping ``context``-character sequences of the
first part (ids 0..n-1). Queries ("completion given prompt", docs/methods.md section 1: f = log p of
the completion, i.e. minus its summed token loss; Q = 1) are the ``model.options.queries``
pairs, then ``data.query_size`` sequences of the held-out part (``query_split: test``) or of the
training set itself (``query_split: train``: each should be its own top proponent), each split
after ``prompt_len`` characters.

Training: AdamW with warm-up and cosine decay (:func:`pipelines.families.chargpt.train_lm`); an "epoch" is
``ceil(n / batch_size)`` steps of batches drawn at random. Checkpoints: the last epoch, or with
``train.checkpoints: all`` ``saved_checkpoints`` evenly spaced epochs, each recording the mean
learning rate since the previous one (TracIn's eta_c).

Features: the dense projected per-example gradients (``vmap`` over ``functional_call``), or with
``featurize.projection: factored`` the per-layer Kronecker projection of :mod:`tda.featurizers.factored`
(``featurize.k_in`` x ``featurize.k_out`` per linear layer; the token and position embeddings,
layer norms and a tied LM head are not covered). Scorers: ``trak``, ``tracin`` (learning rates
from the checkpoints), ``graddot``, ``gradcos``, and on representations (mean over the real
tokens of ``transformer.ln_f``, the final layer norm, by default) ``repsim`` and ``airrep``.
AirRep's training queries are the ``score.options.queries`` sequences of the first part that
follow the training sequences (never trained on, disjoint from the held-out queries: checked
character by character), split after ``prompt_len`` characters like the held-out queries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from tda.data.loading import DEMO_DATA, arrow_columns, example_ids
from tda.errors import ConfigError, DataError
from tda.featurizers.gradient import load_checkpoint
from tda.models.tasks import Task

from pipelines.layout import load_checkpoint_list
from pipelines.report import titles
from pipelines.spec.options import score_options
from pipelines.families.base import Family, Reporting, Representations, Retraining, SaveFn, resolved_projection
from pipelines.families.jobs import SubsetJob, take_rows
from pipelines.families.registry import family_for, register_family

if TYPE_CHECKING:
    from pipelines.layout import RunPaths
    from pipelines.spec.schema import RunConfig

DEFAULT_CORPUS = str(DEMO_DATA / "tinyshakespeare.txt.gz")  # shipped with tda


@dataclass
class LMOptions:
    """``model.options`` of the causal-lm family."""

    context: int = 64  # sequence length (the model's n_positions)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    reduction: str = "sum"  # f = summed ("sum") or mean ("mean") completion log-probability
    test_start: float = 0.9  # corpus fraction where the held-out part starts
    prompt_len: int = 16  # prompt characters of held-out / training-sequence queries
    queries: list[list[str]] = field(default_factory=list)  # [prompt, completion] pairs, queried first
    saved_checkpoints: int = 4  # evenly spaced checkpoints when train.checkpoints = all

    def __post_init__(self) -> None:
        from pipelines.families.chargpt import GPTSpec

        GPTSpec(seq_len=self.context, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)
        if self.reduction not in ("sum", "mean"):
            raise ConfigError("model.options.reduction must be 'sum' or 'mean'")
        if not 0 < self.test_start < 1 or not 1 <= self.prompt_len < self.context:
            raise ConfigError("model.options needs 0 < test_start < 1 and 1 <= prompt_len < context")
        if self.saved_checkpoints < 1:
            raise ConfigError("model.options.saved_checkpoints must be >= 1")
        if any(len(q) != 2 for q in self.queries):
            raise ConfigError(f"model.options.queries must be [prompt, completion] pairs, got {self.queries}")


@functools.lru_cache(maxsize=2)
def load_corpus(root: str):
    """``(text, vocab)`` of a corpus file or of ``<folder>/input.txt``."""
    from pipelines.families.chargpt import CharVocab, load_text

    path = Path(root)
    text = load_text(path / "input.txt" if path.is_dir() else path)
    return text, CharVocab.from_text(text)


class CausalLMFamily(Representations, Retraining, Reporting, Family):
    """Character-level GPT-2 attributed through the completion log-probability."""

    name = "causal-lm"
    archs = ("gpt2",)
    data_names = ("tinyshakespeare", "text")
    feature_kinds = ("gradients", "representations")
    options_type = LMOptions
    airrep_budget = (128, 24, 1 / 3)  # a subset model: ~10 s on 2 cores at the demo's size

    def check(self, cfg: RunConfig) -> None:
        moved = [key for key in ("projection", "k_in", "k_out") if key in cfg.model.options]
        if moved:
            raise ConfigError(f"model.options.{moved[0]} has moved to featurize.{moved[0]} (the factored projection is "
                              f"a featurize setting for every family now): move {moved} to the featurize section")
        super().check(cfg)
        if cfg.model.hidden != [128]:
            raise ConfigError("the causal-lm family sizes the model with model.options (n_layer, n_head, n_embd); "
                              "remove model.hidden")

    @staticmethod
    def corpus_root(cfg: RunConfig) -> str:
        return cfg.data.root or DEFAULT_CORPUS

    def datasets(self, cfg: RunConfig, paths: RunPaths | None = None) -> dict[str, Any]:
        from pipelines.families.chargpt import completion_examples, lm_sequences

        o, d = self.options(cfg), cfg.data
        text, vocab = load_corpus(self.corpus_root(cfg))
        split = int(len(text) * o.test_start)
        train = lm_sequences(text[:split], vocab, o.context, n=d.train_size)
        if d.label_noise:
            train = noisy_sequences(train, d.label_noise, d.seed)
        source = train if d.query_split == "train" else lm_sequences(text[split:], vocab, o.context)
        n_held = min(d.query_size or len(source), len(source))
        if d.query_path:  # queries from a file: its (prompt, completion) rows and ids
            from tda.data.query_files import load_table, text_queries

            ids, pairs = text_queries(load_table(d.query_path, d.query_size))
            return {"train": train, "query": completion_examples(vocab, pairs, o.context, ids)}
        seqs = [vocab.decode(r) for r in arrow_columns(source.with_format("arrow")[:n_held])["input_ids"]]
        pairs = [(p, c) for p, c in o.queries] + [(s[: o.prompt_len], s[o.prompt_len:]) for s in seqs]
        return {"train": train, "query": completion_examples(vocab, pairs, o.context)}

    def spec(self, cfg: RunConfig):
        from pipelines.families.chargpt import GPTSpec

        o = self.options(cfg)
        _, vocab = load_corpus(self.corpus_root(cfg))
        return GPTSpec(vocab.size, o.context, o.n_layer, o.n_head, o.n_embd)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        from pipelines.families.chargpt import build_gpt2

        return build_gpt2(self.spec(cfg))

    def task(self, cfg: RunConfig) -> Task:
        from tda.models.lm import LMTask

        return LMTask(self.options(cfg).reduction)

    def collate(self, cfg: RunConfig) -> Callable[[Any], dict[str, torch.Tensor]]:
        from tda.models.lm import lm_collate

        return lm_collate

    def checkpoint_epochs(self, cfg: RunConfig) -> list[int]:
        return self.spread_epochs(cfg, self.options(cfg).saved_checkpoints)

    def train(self, cfg: RunConfig, paths: RunPaths, model_index: int, save: SaveFn) -> dict[str, Any]:
        from pipelines.families.chargpt import build_gpt2, dataset_tokens, lm_loss, lm_sequences, train_lm

        t, o = cfg.train, self.options(cfg)
        tokens = dataset_tokens(self.datasets(cfg, paths)["train"])  # (n, T)
        per_epoch = math.ceil(tokens.shape[0] / t.batch_size)
        saved, lrs = set(self.checkpoint_epochs(cfg)), []

        def on_checkpoint(epoch: int, model: nn.Module, record: dict) -> None:
            lrs.append(record["lr"])
            if epoch in saved:
                save(epoch, model, lr=float(np.mean(lrs)), train_loss=record["loss"])
                lrs.clear()

        model = build_gpt2(self.spec(cfg), seed=t.seed + model_index)
        steps = t.epochs * per_epoch
        result = train_lm(model, tokens, steps=steps, lr=t.lr, batch_size=t.batch_size, seed=t.seed + model_index,
                          warmup=max(1, min(100, steps // 10)), checkpoint_every=per_epoch,
                          on_checkpoint=on_checkpoint)
        text, vocab = load_corpus(self.corpus_root(cfg))
        held = lm_sequences(text[int(len(text) * o.test_start):], vocab, o.context)
        held_tokens = dataset_tokens(held.select(range(min(256, len(held)))))
        return {"heldout_loss": lm_loss(model, held_tokens), "train_seconds": round(result.seconds, 1)}

    def representation_module(self, cfg: RunConfig) -> str:
        """The final layer norm (the last transformer block's output, normalised)."""
        return "transformer.ln_f"

    def representation_inputs(self, cfg: RunConfig, split: str) -> Callable:
        from tda.models.lm import lm_representation_inputs

        return lm_representation_inputs

    def airrep_queries(self, cfg: RunConfig) -> Any:
        """The sequences of the first part after the training ones, as "completion given prompt"."""
        from pipelines.families.chargpt import completion_examples, lm_sequences

        o, n, q = self.options(cfg), cfg.data.train_size, score_options(cfg, self).queries
        text, vocab = load_corpus(self.corpus_root(cfg))
        first = text[: int(len(text) * o.test_start)]
        fit = (len(first) - o.context) // o.context + 1
        if n is None or n + q > fit:
            raise DataError(f"AirRep needs {q} training queries after the {n or fit} training sequences, but the part "
                            f"before model.options.test_start holds {fit} sequences of {o.context} characters; lower "
                            "data.train_size or score.options.queries")
        seqs = [vocab.decode(r) for r in lm_sequences(first, vocab, o.context, n=n + q)["input_ids"][n:]]
        pairs = [(s[: o.prompt_len], s[o.prompt_len:]) for s in seqs]
        return completion_examples(vocab, pairs, o.context, ids=range(n, n + q))

    def provenance(self, cfg: RunConfig, role: str, paths: RunPaths | None = None) -> list[str]:
        """One key per corpus character an example covers (``chars/<offset>``); configured
        prompt/completion pairs are ``pair/<j>``."""
        o, d = self.options(cfg), cfg.data
        text, _ = load_corpus(self.corpus_root(cfg))
        split, ctx = int(len(text) * o.test_start), o.context
        n_train = len(self.datasets(cfg, paths)["train"])

        def chars(starts: range) -> list[str]:
            return [f"chars/{c}" for s in starts for c in range(s, s + ctx)]

        if role == "train":
            return chars(range(0, n_train * ctx, ctx))
        if role == "airrep":
            return chars(range(n_train * ctx, (n_train + score_options(cfg, self).queries) * ctx, ctx))
        if d.query_path:  # queries from a file: not corpus text, keyed by their ids
            return [f"file/{i}" for i in example_ids(self.datasets(cfg, paths)["query"])]
        n_seq = len(self.datasets(cfg, paths)["query"]) - len(o.queries)
        first = 0 if d.query_split == "train" else split
        return [f"pair/{j}" for j in range(len(o.queries))] + chars(range(first, first + n_seq * ctx, ctx))

    def subset_job(self, cfg: RunConfig, queries: str = "query", epochs: int | None = None) -> Any:
        return LMSubsetJob(cfg, queries, epochs=epochs)

    def example_texts(self, cfg: RunConfig, paths: RunPaths, split: str) -> dict[int, str]:
        """``id -> text`` of a split's sequences (the report); queries as ``prompt -> completion``."""
        _, vocab = load_corpus(self.corpus_root(cfg))
        cols = arrow_columns(self.datasets(cfg, paths)[split].with_format("arrow")[:])
        out = {}
        for i, ids, mask in zip(cols["id"], cols["input_ids"], cols["loss_mask"]):
            mask = np.asarray(mask).astype(bool)
            first = int(np.argmax(mask)) if mask.any() else len(ids)
            out[int(i)] = (vocab.decode(ids[:first]) + " -> " + vocab.decode(ids[mask]) if split == "query" and mask.any()
                           else vocab.decode(ids))
        return out

    def example_predictions(self, cfg: RunConfig, paths: RunPaths, split: str = "train") -> dict[str, np.ndarray]:
        """Per sequence of ``split``, over every attributed checkpoint: mean next-token ``loss``
        and ``confidence`` (1 - mean p(next token)), the curation baselines; an LM has no class,
        so ``labels`` and ``predicted`` are -1 and ``p_predicted`` is the mean p(next token)."""
        from pipelines.families.chargpt import dataset_tokens, sequence_losses

        dataset = self.datasets(cfg, paths)[split]
        tokens, model, losses, probs = dataset_tokens(dataset), self.build_model(cfg), [], []
        for entry in load_checkpoint_list(paths):
            model.load_state_dict(load_checkpoint(paths.checkpoint_file(entry)))
            loss, prob = sequence_losses(model, tokens)
            losses.append(loss)
            probs.append(prob)
        loss, prob = torch.stack(losses).mean(0).numpy(), torch.stack(probs).mean(0).numpy()
        none = np.full(len(loss), -1, dtype=np.int64)
        return {"ids": np.asarray(example_ids(dataset)), "labels": none, "predicted": none, "p_predicted": prob,
                "loss": loss, "confidence": 1 - prob}

    def accuracy_job(self, cfg: RunConfig) -> Any:
        """tda curate's check: trains the recipe on given rows; per query ``log p(completion | prompt)``."""
        return self.subset_job(cfg)

    #: what tda curate's check averages over the queries (the classifier's is top-1 accuracy)
    check_metric = "log_prob"

    #: tda unlearn: the retrained outputs are the queries' log-probabilities only (no top-1 hits)
    unlearning_hits = False

    def unlearning_job(self, cfg: RunConfig) -> Any:
        """Trains the recipe on given rows; per query ``log p(completion | prompt)``."""
        return self.subset_job(cfg)

    def report(self, cfg: RunConfig, paths: RunPaths) -> str | None:
        return report(self, cfg, paths)


def noisy_sequences(train: Any, fraction: float, seed: int) -> Any:
    """``data.label_noise`` for an LM: a seeded share of training sequences shuffled
    (:func:`tda.workflows.curation.shuffle_sequences`); ids and loss masks unchanged."""
    from tda.workflows.curation import shuffle_sequences

    from pipelines.families.chargpt import _sequence_table

    cols = arrow_columns(train.with_format("arrow")[:])
    tokens, _ = shuffle_sequences(np.stack([np.asarray(r) for r in cols["input_ids"]]), fraction, seed)
    return _sequence_table(np.asarray(cols["id"]), tokens, np.stack([np.asarray(r) for r in cols["loss_mask"]]))


def _clip(text: str, width: int = 70) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def report(family: CausalLMFamily, cfg: RunConfig, paths: RunPaths) -> str:
    """Proponent / opponent training sequences (as text) of the first ``score.show`` queries."""
    o, data = family.options(cfg), family.datasets(cfg, paths)
    _, vocab = load_corpus(family.corpus_root(cfg))
    with np.load(paths.scores / "topk.npz", allow_pickle=False) as z:
        top = {k: z[k] for k in z.files}
    cols = arrow_columns(data["train"].with_format("arrow")[:])
    train_text = {int(i): vocab.decode(s) for i, s in zip(cols["id"], cols["input_ids"])}
    qcols = arrow_columns(data["query"].with_format("arrow")[:])
    ckpts = load_checkpoint_list(paths)
    held = [c["heldout_loss"] for c in ckpts if "heldout_loss" in c]
    lines = [f"\n{cfg.name}: char GPT-2 ({o.n_layer} layers, {o.n_embd} wide, context {o.context}), "
             f"{len(train_text)} training sequences, {len(top['query_ids'])} queries, {len(ckpts)} checkpoints, "
             f"scorer {cfg.score.scorer}, {resolved_projection(cfg, paths)} projection"
             + (f", held-out loss {np.mean(held):.3f} nats/char" if held else ""),
             f"f = log p(completion | prompt) ({o.reduction} over completion tokens); score > 0: training on the "
             "sequence raises f (lowers the completion's loss)"]
    shown = min(5, cfg.score.topk)
    for row in range(min(cfg.score.show, len(top["query_ids"]))):
        ids, mask = qcols["input_ids"][row], qcols["loss_mask"][row].astype(bool)
        first = int(np.argmax(mask))
        lines.append(f"  query id {int(top['query_ids'][row])}: prompt {_clip(vocab.decode(ids[:first]))} -> "
                     f"completion {_clip(vocab.decode(ids[mask]))}")
        for title, kind in zip(titles(cfg.score.scorer, "proponents (raise f)", "opponents (lower f)"),
                               ("proponent", "opponent")):
            lines.append(f"    {title}:")
            for i, s in zip(top[f"{kind}_ids"][row][:shown], top[f"{kind}_scores"][row][:shown]):
                lines.append(f"      train id {int(i):>6}  score {float(s):+.4e}  {_clip(train_text[int(i)])}")
    return "\n".join(lines)


class LMSubsetJob(SubsetJob):
    """Train the causal-LM recipe on the sequences (or on all with data weights); ``log p(completion |
    prompt)`` of every query."""

    supports_weights = True

    def run(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int) -> torch.Tensor:
        return self.run_weighted(train, train_ids, query, query_ids, seed, None)

    def run_weighted(self, train: dict, train_ids: np.ndarray, query: dict, query_ids: np.ndarray, seed: int,
                     weights: torch.Tensor | None) -> torch.Tensor:
        from tda.models.lm import LMTask

        from pipelines.families.chargpt import build_gpt2, train_lm

        t, family = self.cfg.train, family_for(self.cfg)
        tokens = train["input_ids"]  # (|S|, T)
        steps = self.epochs * math.ceil(tokens.shape[0] / t.batch_size)
        model = build_gpt2(family.spec(self.cfg), seed=seed)
        train_lm(model, tokens, steps=steps, lr=t.lr, batch_size=t.batch_size, seed=seed,
                 warmup=max(1, min(100, steps // 10)), weights=weights)
        task = LMTask(family.options(self.cfg).reduction)
        with torch.no_grad():
            return torch.cat([task.output(model.eval(), take_rows(query, slice(lo, lo + 256)))
                              for lo in range(0, len(query_ids), 256)])


register_family(CausalLMFamily())
