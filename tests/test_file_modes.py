"""Stored files follow the umask; trained checkpoints are byte-reproducible."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pipelines.cli.main import main
from stores._io import save_json

ROOT = Path(__file__).resolve().parents[1]


def test_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        save_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        save_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_identical_training_gives_identical_checkpoints(tmp_path) -> None:
    for name in ("a", "b"):
        assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--only", "train", "--out", str(tmp_path / name),
                     "--quiet"]) == 0
    files = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.pt"))
    assert files and all((tmp_path / "a" / "checkpoints" / f).read_bytes() == (tmp_path / "b" / "checkpoints" / f)
                         .read_bytes() for f in files)
    assert stat.S_IMODE((tmp_path / "a" / "run.json").stat().st_mode) == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
