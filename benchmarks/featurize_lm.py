"""Featurization of transformers against the floor: tokens (or rows) per second and peak memory of
each tda projection, of traker's and bergson's, and of one plain batched forward + backward of the
same output (the floor: parameter ``.grad`` only, no per-example anything), on the CPU (issue 26).

Models (random init, eager attention, ``transformers`` configs; nothing downloaded):

- ``char``: GPT-2, 4 layers, 256 wide, 4 heads, a character vocabulary of TinyStories (~75
  symbols), 128-token sequences; f = mean next-token log-probability (``HFCausalLMTask``);
- ``gpt2``: the same with GPT-2's 50,257-token vocabulary (``../shared/data/gpt2-tokenizer``),
  the embedding 80% of the parameters;
- ``bert``: a BERT classifier, 2 layers, 64 wide, a 30,522-row vocabulary (AG News words hashed
  into it), 4 classes, rows padded to their batch's longest (<= 64 tokens), ``pad_token_id`` 0;
  f = the classification margin (``HFClassificationTask``).

Each (model, variant, k) runs in its own process (peak RSS is per process); one batch is run
first, untimed (first-call costs of torch and transformers, ``auto``'s check on a batch), then
every row is timed, ``--repeats`` times (the fastest pass is reported: other processes only ever
slow a pass down). ``auto`` is the
default (:mod:`tda.featurizers.choice`); its row names what it chose. Coverage is the share of
trainable parameters the projection differentiates.

Peers (:mod:`featurize_lm_peers`), same f, batches, k and threads, features of every row kept:

- ``traker``: MadryLab traker's gradient computer (vmap; its iterative one, a backward per
  example, where the model refuses vmap, as BERT does) over every parameter, and the projector
  ``TRAKer`` uses on a CPU, ``BasicProjector`` (normal entries, regenerated in 100-column blocks
  on every batch).
- ``bergson`` / ``bergson-module``: EleutherAI bergson 2.5.1's ``GradientCollector`` hooks on
  ``base_model`` (as ``bergson.collect_gradients``), driven by our backward of f, so f is the
  same (bergson's own pipeline only offers LM losses: cross-entropy, KL, label log-odds).
  ``bergson``: its ``global`` projection, k dims exactly (the (d, k) matrix regenerated each
  batch); ``bergson-module``: its default ``per_module`` double-sided p x p sketch of each
  module, p = floor(sqrt(k / modules)) (the row says how many dims). Coverage: the weights of
  ``nn.Linear`` / HF ``Conv1D`` modules under ``base_model`` only (no embeddings, LayerNorms,
  biases at its default, LM or classifier head); its hooks assert 3-d (N, S, I) inputs, so
  BERT's pooler (2-d [CLS] input) is left out through its ``filter_modules``. bergson is not in
  the tda environment: the bergson rows run under ``--bergson-python`` (default
  ``$TDA_BERGSON_PYTHON``, else this interpreter), and say "not installed" where it lacks it.

``--check`` compares the warm-up batch's feature inner products, scaled to a JL sketch (traker
by 1/sqrt(k), tda by sqrt(d/k): ``E<phi, phi'> = k/d <g, g'>``, bergson as is), with those of
exact per-example gradients of the covered parameters (one autograd pass per example): the rms
of ``(<phi_i, phi_j> - <g_i, g_j>) / (|g_i| |g_j|)`` beside ``sqrt(2/k)`` (k the feature width),
what a Gaussian sketch of k dims gives at most. Double-sided (Kronecker) sketches, tda's
``factored`` and ``bergson-module``, are noisier than that by design.

    python benchmarks/featurize_lm.py                              # every model, k = 1024 and 4096
    python benchmarks/featurize_lm.py --models char --k 1024 --variants floor auto sparse
    TDA_BERGSON_PYTHON=/tmp/benv/bin/python python benchmarks/featurize_lm.py --models char \
        --k 1024 --variants floor tensorsketch traker bergson bergson-module --n 32 --repeats 1 --check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODELS = ("char", "gpt2", "bert")
PEERS = ("traker", "bergson", "bergson-module")
VARIANTS = ("floor", "auto", "sparse", "tensorsketch", "factored", "dense") + PEERS


def _stories(chars: int = 400_000) -> str:
    return (DATA / "tinystories-sample" / "tinystories_train_head_944KB.txt").read_text(encoding="utf-8")[:chars]


def lm_batches(kind: str, n: int, seq: int = 128):
    """The causal LM, its task, and n sequences of ``seq`` tokens as a mapping of tensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tda.models.hf import HFCausalLMTask

    text = _stories()
    if kind == "char":
        vocab = sorted(set(text))
        ids = torch.tensor([vocab.index(c) for c in text[: n * seq + 1]])
        size = len(vocab)
    else:
        from tda.models.hf import load_gpt2_tokenizer

        tok = load_gpt2_tokenizer(DATA / "gpt2-tokenizer")
        ids = torch.tensor(tok(text)["input_ids"][: n * seq])
        size = 50257
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=size, n_positions=seq, n_embd=256, n_layer=4, n_head=4, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    rows = ids[: n * seq].reshape(n, seq)
    data = {"input_ids": rows, "attention_mask": torch.ones_like(rows), "loss_mask": torch.ones_like(rows)}
    return model, HFCausalLMTask(reduction="mean"), data, n * seq


def bert_batches(n: int, width: int = 30522, longest: int = 64):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tda.models.hf import HFClassificationTask

    lines = (DATA / "agnews-subset" / "train_subset_10001.tsv").read_text(encoding="utf-8").splitlines()[:n]
    names = sorted({line.rsplit("\t", 1)[1] for line in lines})
    toks = [[101] + [1000 + zlib.crc32(w.encode()) % (width - 1000) for w in line.rsplit("\t", 1)[0].lower().split()]
            [: longest - 2] + [102] for line in lines]
    ids = torch.zeros(n, longest, dtype=torch.long)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = torch.tensor(t)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=width, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=longest, num_labels=len(names), pad_token_id=0,
                     attn_implementation="eager")
    model = BertForSequenceClassification(cfg).eval()
    labels = torch.tensor([names.index(line.rsplit("\t", 1)[1]) for line in lines])
    data = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    return model, HFClassificationTask(), data, n


def floor(model, task, data, batch: int) -> None:
    """One batched forward + backward of the summed output per batch (``.grad`` only)."""
    n = len(data["input_ids"])
    for lo in range(0, n, batch):
        rows = {k: v[lo: lo + batch] for k, v in data.items()}
        if "attention_mask" in rows and rows["input_ids"].ndim == 2 and "loss_mask" not in rows:
            width = int(rows["attention_mask"].sum(1).max())  # the batch padded to its longest, as a collate does
            rows = {k: v[:, :width] if v.ndim == 2 else v for k, v in rows.items()}
        model.zero_grad(set_to_none=True)
        task.output(model, rows).sum().backward()


def _missing(variant: str) -> str | None:
    """Why a peer cannot run in this interpreter, or None."""
    try:
        __import__("trak" if variant == "traker" else "bergson")
    except ImportError as exc:
        return f"not installed in {sys.executable} ({exc})"
    return None


def _batches(data: dict, batch: int, collate):
    for lo in range(0, len(data["input_ids"]), batch):
        rows = {k: v[lo: lo + batch] for k, v in data.items()}
        yield collate(rows) if collate else rows


def setup(a: argparse.Namespace, model, task, data, collate):
    """``run(data) -> features or None``, its description, and the names of the parameters covered."""
    import torch

    import tda

    if a.variant == "floor":
        return (lambda data: floor(model, task, data, a.batch)), {"chose": "floor"}, None
    if a.variant in PEERS:
        import featurize_lm_peers as peers

        if a.variant == "traker":
            one, info, names = peers.traker_featurizer(model, task, a.k)
        else:
            target = "global" if a.variant == "bergson" else "per_module"
            probe = next(_batches(data, a.batch, collate))
            one, info, names = peers.bergson_featurizer(model, task, a.k, target, probe)
        return (lambda data: torch.cat([one(rows) for rows in _batches(data, a.batch, collate)])), info, names
    attr = tda.Attributor(model, [model.state_dict()], collate, task=task, k=a.k, batch_size=a.batch,
                          projection=a.variant, k_in=32, k_out=32)
    info = {}

    def run(data):
        feats = torch.from_numpy(attr.featurize(data).feats[0])
        info["chose"] = attr.projection
        return feats
    return run, info, getattr(attr.featurizer, "names", None)


def worker(a: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    row = {"model": a.model, "variant": a.variant, "k": a.k}
    if a.variant in PEERS and (why := _missing(a.variant)):
        return {**row, "skipped": why}
    torch.set_num_threads(a.threads)
    model, task, data, units = bert_batches(a.n) if a.model == "bert" else lm_batches(a.model, a.n)
    if a.model == "bert":  # rows padded to their batch's longest, as a collate does
        def collate(b):
            width = int(b["attention_mask"].sum(1).max())
            return {k: v[:, :width] if v.ndim == 2 else v for k, v in b.items()}
    else:
        collate = None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    first = {k: v[: a.batch] for k, v in data.items()}  # warm-up (untimed): first-call costs, auto's check
    run, info, names = setup(a, model, task, data, collate)
    feats = run(first)
    seconds, spent = float("inf"), 0.0
    for _ in range(a.repeats):  # the best of a few: other processes on the machine only ever slow a pass
        if spent > a.budget:  # slow variants (traker, bergson's global projection): fewer passes
            break
        start = time.perf_counter()
        run(data)
        seconds = min(seconds, time.perf_counter() - start)
        spent += time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.check and feats is not None:  # after the peak is read: the exact gradients are not the variant's
        from featurize_lm_peers import check

        rows = next(_batches(first, a.batch, collate))
        covered = names or list(params)
        d, width = sum(params[p].numel() for p in covered), feats.shape[1]  # tda: E<phi, phi'> = width/d <g, g'>
        scale = (1.0 if a.variant.startswith("bergson") else width ** -0.5 if a.variant == "traker"
                 else (d / width) ** 0.5)
        row["check"] = check(model, task, rows, feats, covered, scale)
    covered = sum(params[p].numel() for p in names) if names else total
    return {**row, "chose": info["chose"], "per_s": units / seconds, "unit": "rows" if a.model == "bert" else "tokens",
            "peak_mb": peak, "growth_mb": peak - rss0, "coverage": covered / total, "params": total}


def _row(r: dict, base: dict | None, check: bool) -> str:
    if "skipped" in r:
        return f"| {r['model']} | {r['k']} | {r['variant']} | {r['skipped']} |"
    ratio = f"{r['per_s'] / base['per_s']:.2f}" if base else ""
    mem = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else ""
    name = r["variant"] if r["variant"] == r["chose"] else f"{r['variant']} ({r['chose']})"
    line = (f"| {r['model']} | {r['k']} | {name} | {r['per_s']:.0f} {r['unit']} | {ratio} | {r['coverage']:.0%} | "
            f"{r['peak_mb']:.0f} | {mem} |")
    if check:
        c = r.get("check")
        line += f" {c['rms']:.3f} (JL {c['jl']:.3f}) |" if c else " |"
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--k", nargs="*", type=int, default=[1024, 4096])
    p.add_argument("--n", type=int, default=64, help="sequences (LM) or rows (BERT)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per process; the fastest is reported")
    p.add_argument("--budget", type=float, default=60.0,
                   help="no further pass once the passes so far took this many seconds (slow variants: fewer)")
    p.add_argument("--check", action="store_true",
                   help="compare the warm-up batch's feature inner products with exact per-example gradients'")
    p.add_argument("--bergson-python", default=os.environ.get("TDA_BERGSON_PYTHON", sys.executable),
                   help="interpreter of the bergson rows (bergson needs its own venv; env TDA_BERGSON_PYTHON)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="char", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="floor", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.k = a.k[0]
        print(json.dumps(worker(a)))
        return 0
    rows = []
    print("| model | k | variant (chose) | per s | x floor | coverage | peak MB | x floor peak |"
          + (" check: rms err (JL) |" if a.check else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if a.check else ""))
    for model in a.models:
        base = None
        for k in a.k:
            for variant in a.variants:
                if variant == "floor" and base is not None:
                    continue
                python = a.bergson_python if variant.startswith("bergson") else sys.executable
                cmd = [python, __file__, "--worker", "--model", model, "--variant", variant, "--k", str(k),
                       "--n", str(a.n), "--batch", str(a.batch), "--threads", str(a.threads), "--repeats",
                       str(a.repeats), "--budget", str(a.budget)] + (["--check"] if a.check else [])
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                except OSError as exc:  # e.g. a --bergson-python that is not there
                    print(f"| {model} | {k} | {variant} | cannot start {python}: {exc} |")
                    continue
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                    print(f"| {model} | {k} | {variant} | failed: {last[:120]} |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                base = r if variant == "floor" else base
                rows.append(r)
                print(_row(r, base, a.check), flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
