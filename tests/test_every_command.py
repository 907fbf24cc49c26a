"""Every command on models users bring, from configs: a user's CNN on CIFAR-2 colour images stored
HWC (checkpoints recorded with tda.CheckpointRecorder) and a tiny Hugging Face GPT-2 LM:
``tda run | query | validate | curate (with data.label_noise) | unlearn | report``, and the
server's answers. Outputs are compared with references: the server's answer for a stored query
fed as a new input equals the stored answer; curation ranks the flipped labels first; the
report's images are the stored pictures."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch import nn

from pipelines.cli.main import main
from pipelines.layout import RunPaths

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR2 = DATA / "cifar10" / "cifar2_cat_dog_from_jpeg_uint8.npz"
STORIES = DATA / "tinystories-sample" / "tinystories_train_head_944KB.txt"
GPT2_TOKENIZER = DATA / "gpt2-tokenizer"

CNN = '''
import torch
from torch import nn


def build(width: int = 16) -> nn.Module:
    """(B, 3, 32, 32) colour images -> 2 classes."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * width, 2))
'''


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (the shared data folder ../shared/data is missing)")
    return path


def _import(folder: Path, name: str):
    sys.path.insert(0, str(folder))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(folder))


def _commands(folder: Path, config: str, run: str, extra: list[str]) -> None:
    for argv in (["run", config], ["query", "--run", run, "--list"], ["validate", config, "--set", "validate.subsets=6"],
                 ["unlearn", config, "--set", "unlearn.retrain_seeds=2"], ["report", run], *extra):
        assert main([*argv, *(["--quiet"] if argv[0] not in ("query", "report") else [])]) == 0, argv


@pytest.fixture(scope="module")
def cnn_project(tmp_path_factory) -> Path:
    """CIFAR-2 rows stored as (32, 32, 3) uint8 lists with ClassLabel names; a CNN trained with
    plain PyTorch on x / 255 in NCHW, two epochs recorded by CheckpointRecorder."""
    import tda

    with np.load(_need(CIFAR2)) as z:
        rows, qrows = np.random.default_rng(0).permutation(10_000)[:600], np.random.default_rng(1).permutation(2_000)[:60]
        x, y, xq, yq = z["x_train"][rows], z["y_train"][rows], z["x_test"][qrows], z["y_test"][qrows]  # sorted by class
    root = tmp_path_factory.mktemp("cnn")
    (root / "cifar_cnn.py").write_text(CNN)
    features = datasets.Features({"image": datasets.Array3D((32, 32, 3), "uint8"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    for name, (xs, ys) in {"train": (x, y), "test": (xq, yq)}.items():
        datasets.Dataset.from_dict({"image": xs, "label": ys.astype(int)}, features=features).save_to_disk(str(root / name))
    torch.manual_seed(0)
    model = _import(root, "cifar_cnn").build()
    inputs, labels = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255), torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rec = tda.CheckpointRecorder(root / "ckpts", tda.CheckpointRecorder.recipe_from(
        opt, epochs=12, batch_size=32, seed=0, schedule="constant")).watch(opt)
    for epoch in range(12):
        for i in torch.randperm(len(y)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(inputs[i]), labels[i]).backward()
            opt.step()
        if epoch >= 10:
            rec.save(model, epoch=epoch + 1)
    (root / "cfg.yaml").write_text(
        "name: cnn\nout_dir: runs/cnn\nmodel: {factory: cifar_cnn:build, checkpoints: ckpts}\n"
        "data: {train_path: train, query_path: test, train_size: null, query_size: 60}\n"
        "featurize: {k: 128}\nscore: {topk: 5, show: 1}\n")
    return root


def test_a_users_cnn_on_colour_images_through_every_command(cnn_project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(cnn_project)
    _commands(cnn_project, "cfg.yaml", "runs/cnn", [["query", "--run", "runs/cnn", "--example", "0", "-k", "2"],
              ["curate", "cfg.yaml", "--set", "data.label_noise=0.1", "--set", "curate.retrain_seeds=1", "--out",
               "runs/noisy"]])
    out = capsys.readouterr().out
    assert re.search(r"label (cat|dog) \(\d\)\s+predicted (cat|dog) \(\d\) p \d\.\d\d", out)
    entries = json.loads((cnn_project / "runs/cnn/checkpoints/checkpoints.json").read_text())["checkpoints"]
    assert [e["lr"] for e in entries] == [2e-3, 2e-3] and min(e["sample_accuracy"] for e in entries) > 0.65
    curation = json.loads((cnn_project / "runs/noisy/curation/curation.json").read_text())
    assert curation["label_noise"]["flipped"] == 60 and curation["methods"]["loss"]["auc"] > 0.65
    validation = json.loads((cnn_project / "runs/cnn/validation/validation.json").read_text())
    assert "trak" in validation["scorers"] and "recipe" in validation
    # the report shows the stored colour pictures, not channel stripes
    html = (cnn_project / "runs/cnn/report.html").read_text()
    from PIL import Image

    shown = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
             for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    stored = {bytes(np.asarray(r["image"], np.uint8)) for r in datasets.load_from_disk(str(cnn_project / "train"))}
    stored |= {bytes(np.asarray(r["image"], np.uint8)) for r in datasets.load_from_disk(str(cnn_project / "test"))}
    colour = [img for img in shown if img.shape == (32, 32, 3)]
    assert colour and all(bytes(img) in stored for img in colour)


def test_the_server_answers_a_new_input_as_the_stored_query(cnn_project: Path, monkeypatch) -> None:
    from pipelines.imports import CodeTrustError, untrusted_run
    from pipelines.query.serve import answer_json
    from pipelines.query.state import Service

    monkeypatch.chdir(cnn_project)
    run = cnn_project / "runs/cnn"
    if not (run / "scores").is_dir():
        assert main(["run", "cfg.yaml", "--quiet"]) == 0
    service = Service.load(RunPaths(run))
    qid = int(next(iter(service.rows)))
    row = datasets.load_from_disk(str(cnn_project / "test"))[qid]
    rows = [{"image": np.asarray(row["image"]).tolist(), "label": row["label"]}]
    with untrusted_run(run, trusted=False), pytest.raises(CodeTrustError, match="--trust-code"):
        service.new_inputs(rows, 5)  # `tda serve RUN` without --trust-code: the folder's model code does not run
    new = answer_json(service.new_inputs(rows, 5))
    stored = answer_json(service.run.answer([qid], "query", 5))
    for side in ("proponents", "opponents"):
        assert [p["id"] for p in new["results"][0][side]] == [p["id"] for p in stored["results"][0][side]]


@pytest.fixture(scope="module")
def lm_project(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    from tda.models.hf import load_gpt2_tokenizer

    lines = [ln for ln in _need(STORIES).read_text(encoding="utf-8").splitlines() if len(ln.split()) > 12][:16]
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "base")
    load_gpt2_tokenizer(_need(GPT2_TOKENIZER)).save_pretrained(root / "base")
    texts = [" ".join(ln.split()[:20]) for ln in lines]
    datasets.Dataset.from_dict({"text": texts[:12]}).save_to_disk(str(root / "train"))
    datasets.Dataset.from_dict({"prompt": [" ".join(t.split()[:6]) for t in texts[:4]],
                                "completion": [" " + " ".join(t.split()[6:10]) for t in texts[:4]]}).to_parquet(
        str(root / "q.parquet"))
    (root / "cfg.yaml").write_text(
        "name: lm\nout_dir: runs/lm\nmodel: {hf: base, check_trained: false}  # a random tiny GPT-2\n"
        "data: {train_path: train, query_path: q.parquet, train_size: null, query_size: 4, max_length: 32}\n"
        "featurize: {k: 32, batch_size: 4, params: [transformer.h]}\nscore: {topk: 3, show: 1}\n"
        "train: {epochs: 1, batch_size: 4, lr: 0.001, optimizer: adamw}\n")
    return root


def test_a_hugging_face_lm_through_every_command(lm_project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(lm_project)
    _commands(lm_project, "cfg.yaml", "runs/lm", [["curate", "cfg.yaml", "--set", "curate.retrain_seeds=1"],
                                                   ["query", "--run", "runs/lm", "--example", "0", "-k", "2"]])
    out = capsys.readouterr().out
    train_texts = datasets.load_from_disk(str(lm_project / "train"))["text"]
    assert any(t in out for t in train_texts)  # full training texts in the answer
    curation = json.loads((lm_project / "runs/lm/curation/curation.json").read_text())
    assert curation["check"]["metric"] == "log_prob" and curation["n_train"] == 12
    unlearning = json.loads((lm_project / "runs/lm/unlearning/unlearning.json").read_text())
    assert "sum of the group's completion log-probabilities" in unlearning["output"]
    validation = json.loads((lm_project / "runs/lm/validation/validation.json").read_text())
    assert validation["n_train"] == 12 and "recipe" in validation


def test_query_input_from_an_image_file_answers_as_the_stored_query(cnn_project: Path, monkeypatch, capsys) -> None:
    """``tda query --input picture.png --label L`` (the CLI's new-input path) gives the stored
    query's proponents and opponents for the same picture and label."""
    from PIL import Image

    monkeypatch.chdir(cnn_project)
    run = cnn_project / "runs/cnn"
    if not (run / "scores").is_dir():
        assert main(["run", "cfg.yaml", "--quiet"]) == 0
    row = datasets.load_from_disk(str(cnn_project / "test"))[4]
    Image.fromarray(np.asarray(row["image"], np.uint8)).save(cnn_project / "q4.png")
    label = "cat" if row["label"] == 0 else "dog"
    capsys.readouterr()
    # the run folder names code (model.factory): it runs only when the user says so
    assert main(["query", "--run", "runs/cnn", "--input", "q4.png", "--label", label]) == 2
    assert "CodeTrustError" in capsys.readouterr().err
    assert main(["query", "--run", "runs/cnn", "--input", "q4.png", "--label", label, "-k", "4", "--json",
                 "--trust-code"]) == 0
    new = json.loads(capsys.readouterr().out)
    assert main(["query", "--run", "runs/cnn", "--example", "4", "-k", "4", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    got, want = new["queries"][0], stored["queries"][0]
    assert got["label"] == row["label"] and got["label_name"] == want["label_name"]
    for side in ("proponents", "opponents"):
        assert [p["id"] for p in got[side]] == [p["id"] for p in want[side]]
