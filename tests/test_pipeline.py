"""The default job end to end on a tiny subset, resumption, and the CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli.main import main
from pipelines.config import load_config
from stores import FaissIndex, FeatureStore

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST idx files not found in {MNIST}")
TINY = ["--set", f"data.root={MNIST}", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), *TINY]) == 0
    return out


def test_default_config_parses():
    cfg = load_config(ROOT / "configs" / "mnist_trak.yaml")
    assert cfg.score.scorer == "trak" and cfg.featurize.k == 1024


def test_tiny_run_outputs(tiny_run, capsys):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    train = FeatureStore.open(tiny_run / "features-train")
    query = FeatureStore.open(tiny_run / "features-query")
    assert train.is_complete() and len(train) == cfg.data.train_size and train.k == cfg.featurize.k
    assert len(query) == cfg.data.query_size and train.checkpoints == list(range(cfg.train.models))
    scores = np.load(tiny_run / "scores" / "scores.npy")
    assert scores.shape == (cfg.data.query_size, cfg.data.train_size) and np.isfinite(scores).all()
    with np.load(tiny_run / "scores" / "topk.npz") as z:
        top = {k: z[k] for k in z.files}
    # the index's top-k equals brute force over the dense scores
    brute = np.argsort(-scores, axis=1)[:, : cfg.score.topk]
    np.testing.assert_allclose(top["proponent_scores"], np.take_along_axis(scores, brute, 1), rtol=1e-4, atol=1e-6)
    low = np.sort(scores, axis=1)[:, : cfg.score.topk]
    np.testing.assert_allclose(top["opponent_scores"], low, rtol=1e-4, atol=1e-6)
    assert len(FaissIndex.load(tiny_run / "index")) == cfg.data.train_size
    manifest = json.loads((tiny_run / "features-train" / "manifest.json").read_text())
    assert manifest["spec"]["k"] == cfg.featurize.k and manifest["spec"]["split"] == "train"


def test_rerun_skips_everything_and_changed_config_is_refused(tiny_run, capsys):
    store = tiny_run / "features-train" / "manifest.json"
    before = store.stat().st_mtime_ns
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tiny_run), *TINY]) == 0
    assert store.stat().st_mtime_ns == before
    code = main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tiny_run), *TINY,
                 "--set", "featurize.k=32"])
    assert code == 2 and "overwrite" in capsys.readouterr().err
    assert store.stat().st_mtime_ns == before


def test_resume_after_lost_shards_gives_identical_scores(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    manifest_path = copy / "features-train" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    m["complete"] = {k: v for k, v in m["complete"].items() if not k.endswith("/1")}  # forget shard 1
    manifest_path.write_text(json.dumps(m))
    shutil.rmtree(copy / "scores")
    shutil.rmtree(copy / "index")
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(copy), *TINY]) == 0
    np.testing.assert_array_equal(np.load(copy / "scores" / "scores.npy"), np.load(tiny_run / "scores" / "scores.npy"))


def test_queries_spanning_several_shards_are_all_scored(tmp_path):
    """More queries than featurize.shard_size: every query shard is scored, not only the first."""
    out = tmp_path / "multi"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), *TINY,
                 "--set", "featurize.shard_size=8", "--set", "train.models=1"]) == 0
    n_query = load_config(ROOT / "configs" / "tiny.yaml").data.query_size  # 20 queries: 3 shards of 8
    assert np.load(out / "scores" / "scores.npy").shape[0] == n_query
    with np.load(out / "scores" / "topk.npz") as z:
        assert len(z["query_ids"]) == len(z["proponent_ids"]) == n_query


def test_query_cli(tiny_run, capsys):
    assert main(["query", "--run", str(tiny_run), "--example", "3", "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "query id 3" in out and out.count("train id") == 8
    assert main(["query", "--run", str(tiny_run), "--example", "99999"]) == 2
    assert "not in the query split" in capsys.readouterr().err
    # several examples in one search: the same answers as the precomputed top-k of the score stage
    assert main(["query", "--run", str(tiny_run), "--example", "5", "2", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.index("query id 5") < out.index("query id 2") and "2 queries" in out
    with np.load(tiny_run / "scores" / "topk.npz") as z:
        top = {k: z[k] for k in z.files}
    row = int(np.nonzero(top["query_ids"] == 2)[0][0])
    shown = [int(line.split()[2]) for line in out.split("query id 2")[1].splitlines() if "train id" in line]
    assert shown[:3] == top["proponent_ids"][row][:3].tolist()


def test_config_typo_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("featurise:\n  k: 8\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'featurize'" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli.main", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--overwrite" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pipelines.cli.main", "query", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--example" in out.stdout


def test_validate_cli_on_tiny_run(tiny_run, capsys):
    args = ["validate", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tiny_run), *TINY,
            "--set", "validate.subsets=8", "--set", "validate.queries=6", "--set", "validate.removal_queries=1",
            "--set", "validate.removal_ks=[20]", "--set", "validate.plots=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LDS (classic protocol) over 8 subsets" in out and "report fold" in out
    res = json.loads((tiny_run / "validation" / "validation.json").read_text())
    assert res["folds"] == {"tune_queries": 3, "report_queries": 3, "tune_subsets": 4, "report_subsets": 4}
    assert res["lds"]["chosen_lambda_rel"] in load_config(ROOT / "configs" / "tiny.yaml").validate.lambda_grid
    assert set(res["removal"]["modes"]) == {"top", "random", "bottom"}
    gt = json.loads((tiny_run / "ground-truth" / "manifest.json").read_text())
    assert len(gt["complete"]) == 9  # 8 subsets and the full-set reference
    assert {"trak", "trak (tuned)", "tracin", "graddot", "gradcos"} == set(res["scorers"])
    assert res["scorers"]["trak"]["report"] == {k: res["lds"]["configured"][k] for k in res["scorers"]["trak"]["report"]}
    # rerun as a stage of `tda run`: ground truth and removal retrainings are reused, not recomputed
    mtime = (tiny_run / "ground-truth" / "manifest.json").stat().st_mtime_ns
    assert main(["run", *args[1:], "--only", "validate"]) == 0
    assert "LDS (classic protocol) over 8 subsets" in capsys.readouterr().out
    assert (tiny_run / "ground-truth" / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("scorer", ["tracin", "graddot", "gradcos"])
def test_gradient_scorers_run_from_config(tmp_path, scorer):
    """TracInCP / Grad-Dot / Grad-Cos through the pipeline equal the float64 formula on the stores."""
    out = tmp_path / scorer
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), *TINY,
                 "--set", f"score.scorer={scorer}", "--set", "train.checkpoints=all"]) == 0
    ckpts = json.loads((out / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    train_cfg = json.loads((out / "run.json").read_text())["config"]["train"]
    tf, qf = (np.concatenate([b.feats for b in FeatureStore.open(out / f"features-{split}").iter_blocks()],
                             axis=1).astype(np.float64) for split in ("train", "query"))  # (C, n, k), (C, m, k)
    assert len(ckpts) == tf.shape[0] > 1
    if scorer == "gradcos":
        tf = tf / np.linalg.norm(tf, axis=2, keepdims=True)
        qf = qf / np.linalg.norm(qf, axis=2, keepdims=True)
    if scorer == "tracin":  # the learning rate each checkpoint's epoch was trained with
        weights = [train_cfg["lr"] * (1 - c["epoch"] / train_cfg["epochs"]) for c in ckpts]
    else:
        weights = [1.0 / len(ckpts)] * len(ckpts)
    expected = sum(w * qf[c] @ tf[c].T for c, w in enumerate(weights))
    got = np.load(out / "scores" / "scores.npy")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_topk_only_scoring_skips_the_dense_matrix(tiny_run, tmp_path):
    """score.dense=false (large n): top-k from the index, identical to the dense run's, no scores.npy."""
    out = tmp_path / "topk-only"
    shutil.copytree(tiny_run, out)
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), *TINY, "--from", "score",
                 "--set", "score.dense=false"]) == 0
    assert not (out / "scores" / "scores.npy").exists()
    with np.load(tiny_run / "scores" / "topk.npz") as za, np.load(out / "scores" / "topk.npz") as zb:
        for key in za.files:
            np.testing.assert_array_equal(za[key], zb[key])
