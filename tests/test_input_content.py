"""Inputs count by content (issue 11 item 5): moved or respelled data reuses the run, data changed
in place is refused naming the key and the fix, and each file is hashed once (``inputs.json``)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np

from pipelines.cli.main import main
from stores.digests import DigestCache
from tda.data.loading import DEMO_DATA

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _run(out: Path, root: str, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["run", TINY, "--out", str(out), "--quiet", "--set", f"data.root={root}", *extra])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _flip_a_label(folder: Path) -> None:
    """Rewrite the training labels with the first one changed (same path, same size)."""
    path = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8] = (raw[8] + 1) % 10
    path.write_bytes(gzip.compress(bytes(raw), mtime=0))


def test_moved_data_is_reused_and_changed_data_is_refused(tmp_path, capsys, monkeypatch) -> None:
    data = tmp_path / "a"
    shutil.copytree(DEMO_DATA / "mnist", data)
    out = tmp_path / "run"
    rc, text = _run(out, str(data), capsys)
    assert rc == 0, text
    before = (out / "scores" / "scores.npy").read_bytes()
    recorded = json.loads((out / "run.json").read_text())["inputs"]["data.root"]
    assert recorded["path"] == str(data) and len(recorded["sha256"]) == 64

    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    os.rename(data, moved)
    monkeypatch.chdir(tmp_path)
    rc, text = _run(out, "elsewhere/../elsewhere/b", capsys)  # another folder, spelled relative
    assert rc == 0, text
    assert "0 shard job(s) run" in text and (out / "scores" / "scores.npy").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["inputs"]["data.root"]["path"] == str(moved)

    _flip_a_label(moved)
    rc, text = _run(out, str(moved), capsys)
    assert rc == 2 and "Traceback" not in text
    assert "the content of data.root changed" in text and str(moved) in text and "--overwrite" in text
    assert (out / "scores" / "scores.npy").read_bytes() == before  # nothing touched
    rc, text = _run(out, str(moved), capsys, "--overwrite")
    assert rc == 0, text


def test_a_changed_query_file_is_featurized_again(tmp_path, capsys) -> None:
    import datasets

    rows = {"image": [np.zeros((28, 28), np.uint8).tolist()] * 3, "label": [1, 2, 3]}
    qfile = tmp_path / "q.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(qfile))
    out = tmp_path / "run"
    argv = ["run", TINY, "--out", str(out), "--quiet", "--set", f"data.query_path={qfile}"]
    assert main(argv) == 0
    rows["image"] = [np.full((28, 28), 255, np.uint8).tolist()] * 3
    datasets.Dataset.from_dict(rows).to_parquet(str(qfile))
    capsys.readouterr()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "query 3 examples x 2 checkpoint(s), 2 shard job(s) run" in text, text
    assert "train 300 examples x 2 checkpoint(s), 0 shard job(s) run, all reused" in text


def test_each_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    calls = []
    import stores.digests as digests

    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda p: calls.append(p) or real(p))
    cache = DigestCache()
    first = cache.digest(f)
    assert cache.digest(f) == first and len(calls) == 1
    cache.save(tmp_path / "inputs.json")
    again = DigestCache()
    again.load(tmp_path / "inputs.json")
    assert again.digest(f) == first and len(calls) == 1  # remembered across processes
    f.write_bytes(b"abd")
    assert again.digest(f) != first and len(calls) == 2
    (tmp_path / "inputs.json").write_text("{broken")
    DigestCache().load(tmp_path / "inputs.json")  # a damaged cache is ignored
