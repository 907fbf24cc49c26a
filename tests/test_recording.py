"""Checkpoint recording (``tda-checkpoints/1``): a plain PyTorch loop with an LR schedule records
the lr each checkpoint's last update used, files that load back bit-equal with their sha256, runs
that accumulate and re-recordings that replace; a real ``transformers.Trainer`` run (a tiny random
BERT, offline) lists every ``checkpoint-N`` folder with the scheduler's lr, its epoch and the
recipe from ``TrainingArguments``; foreign or corrupt manifests raise ``CheckpointError``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

import tda
from tda.errors import CheckpointError, ConfigError, MissingDependencyError
from tda.models.recording import MANIFEST_NAME, CheckpointRecorder, read_manifest, update_manifest

LR, EPOCHS, BATCHES = 0.1, 3, 2


def _train(folder: Path, model_index: int, watch: bool) -> list[dict[str, torch.Tensor]]:
    """Train nn.Linear for EPOCHS x BATCHES SGD steps; save every epoch. Without ``watch`` the
    recorder reads the optimizer before ``scheduler.step()`` (LambdaLR, epoch-linear); with it
    the save comes after a StepLR step and the recorder's step hook supplies lr and step."""
    torch.manual_seed(model_index)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if watch:
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 - e / EPOCHS)
    recipe = CheckpointRecorder.recipe_from(opt, epochs=EPOCHS, batch_size=4, seed=model_index,
                                            schedule=None if watch else "epoch-linear")
    rec = CheckpointRecorder(folder, recipe, model_index=model_index)
    if watch:
        rec.watch(opt)
    saved = []
    for epoch in range(EPOCHS):
        for _ in range(BATCHES):
            x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if watch:
            sched.step()
            rec.save(model, epoch=epoch + 1)
        else:
            rec.save(model, opt, step=(epoch + 1) * BATCHES, epoch=epoch + 1)
            sched.step()
        saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return saved


def test_plain_pytorch_records_schedule_lrs_files_and_runs(tmp_path: Path) -> None:
    run0 = _train(tmp_path, 0, watch=False)
    run1 = _train(tmp_path, 1, watch=True)
    manifest = read_manifest(tmp_path, verify=True)
    assert manifest is not None and manifest["format"] == "tda-checkpoints/1"
    assert manifest["recipe"] == {"optimizer": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 0.0,
                                  "schedule": "epoch-linear", "epochs": EPOCHS, "batch_size": 4, "seed": 0}
    entries = manifest["checkpoints"]
    assert [(e["model"], e["step"], e["epoch"]) for e in entries] == (
        [(m, (e + 1) * BATCHES, float(e + 1)) for m in (0, 1) for e in range(EPOCHS)])
    assert [e["lr"] for e in entries[:EPOCHS]] == [LR * (1 - e / EPOCHS) for e in range(EPOCHS)]
    assert [e["lr"] for e in entries[EPOCHS:]] == [LR * 0.5 ** e for e in range(EPOCHS)]
    assert entries[0]["file"] == "ckpt-00-000002.pt" and entries[-1]["file"] == "ckpt-01-000006.pt"
    for entry, state in zip(entries, run0 + run1):
        path = tmp_path / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        loaded = torch.load(path, weights_only=True)
        model = nn.Linear(3, 2)
        model.load_state_dict(loaded)
        assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".pt")) == [
        ".tda-checkpoints.lock", MANIFEST_NAME]  # no temporary files left


def test_rerecording_replaces_its_entry_and_recipes_must_agree(tmp_path: Path) -> None:
    rec = CheckpointRecorder(tmp_path, {"lr": 0.1, "seed": 3}, model_index=1)
    first = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    rec.save(first, step=10, lr=0.1)
    rec.save({k: v + 1 for k, v in first.items()}, step=10, epoch=0.5, lr=0.05)
    rec.save(first, epoch=2, lr=0.01)
    again = CheckpointRecorder(tmp_path / "again", model_index=1)
    again.save(first, epoch=2, lr=0.01)  # identical weights, identical bytes
    assert (tmp_path / "again" / "ckpt-01-epoch002.pt").read_bytes() == (tmp_path / "ckpt-01-epoch002.pt").read_bytes()
    by_epoch, entry = read_manifest(tmp_path, verify=True)["checkpoints"]  # entries without a step sort first
    assert (entry["file"], entry["lr"], entry["epoch"]) == ("ckpt-01-000010.pt", 0.05, 0.5)
    assert torch.equal(torch.load(tmp_path / entry["file"], weights_only=True)["bias"], torch.ones(2))
    assert by_epoch["file"] == "ckpt-01-epoch002.pt" and "step" not in by_epoch
    CheckpointRecorder(tmp_path, {"lr": 0.1, "seed": 0, "epochs": 2}, model_index=0)  # model 0's seed is kept
    assert read_manifest(tmp_path)["recipe"] == {"lr": 0.1, "seed": 0, "epochs": 2}
    with pytest.raises(CheckpointError, match="another training recipe.*lr: 0.1 recorded, 0.2 now"):
        CheckpointRecorder(tmp_path, {"lr": 0.2})
    (tmp_path / entry["file"]).write_bytes(b"changed")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        read_manifest(tmp_path, verify=True)


def test_recipe_from_optimizers_and_save_errors(tmp_path: Path) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert CheckpointRecorder.recipe_from(torch.optim.Adam(params, lr=1e-3)) == {
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
    assert CheckpointRecorder.recipe_from(torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1), seed=1) == {
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.1, "seed": 1}
    assert "optimizer" not in CheckpointRecorder.recipe_from(torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                                                             nesterov=True))
    with pytest.raises(ConfigError, match="schedule"):
        CheckpointRecorder.recipe_from(torch.optim.SGD(params, lr=0.1), schedule="step")
    with pytest.raises(ConfigError, match="unknown key 'betas'"):
        CheckpointRecorder(tmp_path, {"betas": [0.9, 0.99]})
    rec = CheckpointRecorder(tmp_path)
    with pytest.raises(ConfigError, match="pass lr=, optimizer="):
        rec.save(nn.Linear(2, 2), step=1)
    with pytest.raises(ConfigError, match="step= or a whole epoch="):
        rec.save(nn.Linear(2, 2), epoch=0.5, lr=0.1)
    with pytest.raises(ConfigError, match="lr=nan"):
        rec.save(nn.Linear(2, 2), step=1, lr=float("nan"))
    assert not list(tmp_path.glob("*.pt"))
    assert "CheckpointRecorder" in dir(tda) and tda.CheckpointRecorder is CheckpointRecorder


def test_concurrent_runs_lose_no_entries(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def record(model: int) -> None:
        for step in range(10):
            update_manifest(tmp_path, recipe={"lr": 0.1, "seed": model}, model_index=model,
                            entry={"file": f"m{model}-{step}.pt", "model": model, "step": step, "lr": 0.1})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(record, range(4)))
    manifest = read_manifest(tmp_path)
    assert [(e["model"], e["step"]) for e in manifest["checkpoints"]] == [(m, s) for m in range(4) for s in range(10)]
    assert manifest["recipe"] == {"lr": 0.1, "seed": 0}


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ('{"format": "other/2", "checkpoints": []}', "format is 'other/2'"),
    ('{"format": "tda-checkpoints/1", "checkpoints": [{"file": "a.pt", "model": 0}]}', "has no 'lr'"),
    ('{"format": "tda-checkpoints/1", "checkpoints": [{"file": "../a.pt", "model": 0, "lr": 1}]}', "relative"),
    ('{"format": "tda-checkpoints/1", "recipe": {"optimizer": "lion"}, "checkpoints": []}', "not one of sgd"),
])
def test_corrupt_or_foreign_manifest_raises_checkpoint_error(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=reason) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)
    with pytest.raises(CheckpointError):  # the recorder refuses to overwrite it
        CheckpointRecorder(tmp_path).save({"w": torch.zeros(1)}, step=1, lr=0.1)
    assert read_manifest(tmp_path / "absent") is None


def _trainer_args(out: Path, **kw: object) -> "object":
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
                    warmup_steps=2, save_strategy="steps", save_steps=4, logging_steps=3, report_to=[],
                    use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **kw})


def _run_trainer(args: object) -> object:
    import datasets
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=2)
    ids = torch.randint(1, 100, (24, 8), generator=torch.Generator().manual_seed(0))
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 24,
                                        "labels": [i % 2 for i in range(24)]})
    from tda.integrations.hf import CheckpointCallback

    trainer = transformers.Trainer(model=transformers.BertForSequenceClassification(config), args=args,
                                   train_dataset=train, callbacks=[CheckpointCallback()])
    trainer.train()
    return trainer


def test_trainer_callback_records_every_checkpoint_with_its_lr(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trainer = _run_trainer(_trainer_args(tmp_path))
    manifest = read_manifest(tmp_path, verify=True)
    assert manifest["recipe"] == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "schedule": "linear",
                                  "warmup_steps": 2, "epochs": 2, "batch_size": 4, "seed": 0}
    total, warmup = trainer.state.max_steps, 2
    assert total == 12
    folders = sorted((p.name for p in tmp_path.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    assert [e["file"] for e in manifest["checkpoints"]] == folders == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    logged = {log["step"]: log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log}
    for entry in manifest["checkpoints"]:
        step = entry["step"]
        s = step - 1  # update `step` ran with the lr of scheduler step s (HF linear with warmup)
        expected = 1e-3 * (s / warmup if s < warmup else (total - s) / (total - warmup))
        assert entry["lr"] == pytest.approx(expected, rel=1e-12)
        assert step not in logged or entry["lr"] == logged[step]
        assert entry["epoch"] == pytest.approx(step / 6) and entry["model"] == 0 and "sha256" not in entry
        assert (tmp_path / entry["file"] / "model.safetensors").is_file()
    assert 12 in logged  # logging_steps=3: steps 4 and 8 were not logged, yet their lr is known


def test_trainer_rotation_drops_deleted_checkpoints_and_sgd_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _trainer_args(tmp_path, max_steps=4, save_steps=2, save_total_limit=1, optim="sgd",
                         lr_scheduler_type="constant", logging_steps=1)
    _run_trainer(args)
    manifest = read_manifest(tmp_path, verify=True)
    assert [e["file"] for e in manifest["checkpoints"]] == ["checkpoint-4"]
    assert manifest["checkpoints"][0]["lr"] == 1e-3
    assert manifest["recipe"] == {"optimizer": "sgd", "momentum": 0.0, "lr": 1e-3, "weight_decay": 0.0,
                                  "schedule": "constant", "warmup_steps": 0, "batch_size": 4, "seed": 0}


def test_callback_without_transformers_raises_missing_dependency(monkeypatch) -> None:
    import sys

    import tda.integrations.hf as hf

    monkeypatch.setattr(hf, "_CLASS", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        hf.CheckpointCallback()
