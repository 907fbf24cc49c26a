"""Every write path maps a full disk, a short write and a file-size limit to a StoreError naming
the fix (exit 2, no traceback), and leaves stored data intact: a rerun once the fault is gone
finishes with the same scores as a run that never failed (fault injection by monkeypatching the
writers: numpy's save, faiss.write_index, os.replace)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def clean_scores(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(["run", str(TINY), "--out", str(out), "--quiet"]) == 0
    return np.load(out / "scores" / "scores.npy")


def _short_write(*args, **kwargs):
    raise OSError("8192 requested and 8160 written")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _too_big(*args, **kwargs):
    raise OSError(errno.EFBIG, "File too large")


def _faiss_fails(*args, **kwargs):
    raise RuntimeError("Error in faiss::FileIOWriter::operator()(const void*, size_t, size_t) at faiss/impl/io.cpp:"
                       "98: Error: 'nitems == n' failed: write error")


FAULTS = {  # what fails -> (object, attribute, replacement, words of the message)
    "feature-shard-short-write": ("numpy", "save", _short_write, "a short write is usually a full disk"),
    "feature-shard-disk-full": ("numpy", "save", _no_space, "the disk is full"),
    "file-size-limit": ("numpy", "save", _too_big, "largest file this system allows"),
    "faiss-write-index": ("faiss", "write_index", _faiss_fails, "a short write is usually a full disk"),
    "rename-disk-full": ("os", "replace", _no_space, "the disk is full"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failing_write_is_a_store_error_and_a_rerun_finishes(fault, clean_scores, tmp_path, capsys,
                                                              monkeypatch) -> None:
    module, name, replacement, words = FAULTS[fault]
    target = __import__(module)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(target, name, replacement)
        code = main(["run", str(TINY), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "StoreError" in err and words in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp")) if out.exists() else True  # no temporary file left behind
    assert main(["run", str(TINY), "--out", str(out), "--quiet"]) == 0  # the fault gone, the run finishes
    np.testing.assert_allclose(np.load(out / "scores" / "scores.npy"), clean_scores, rtol=1e-5, atol=1e-7)
