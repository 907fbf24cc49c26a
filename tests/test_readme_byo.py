"""The bring-your-own example of docs/own-model.md, run exactly as written: its file blocks are read
from the page and its command block runs line by line in the example's folder; the scores are then
compared with a reference computed on explicitly preprocessed inputs (float64 loop gradients)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli.main import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"


def readme_blocks() -> dict[str, str]:
    """``{file name: code}`` of every block marked ``<!-- byo:NAME -->`` in docs/own-model.md."""
    found = re.findall(r"<!-- byo:(\S+) -->\n```\w*\n(.*?)```", PAGE.read_text(), flags=re.S)
    return dict(found)


def run_line(line: str, project: Path) -> int:
    """One line of the page's command block (comments stripped), run in ``project``."""
    argv = shlex.split(line.split(" #")[0])
    if argv[0] == "python":
        subprocess.run([sys.executable, *argv[1:]], cwd=project, check=True, capture_output=True, timeout=600)
        return 0
    assert argv[0] == "tda", line
    return main(argv[1:])


def run_readme_example(prefix: str, project: Path, page: Path = PAGE) -> dict[str, str]:
    """Write the ``<!-- PREFIX:NAME -->`` blocks of ``page`` (a docs page) into ``project`` and run its
    ``commands.sh`` block line by line there; ``{command: what it printed}``."""
    from contextlib import redirect_stdout
    from io import StringIO

    blocks = dict(re.findall(rf"<!-- {prefix}:(\S+) -->\n```\w*\n(.*?)```", page.read_text(), flags=re.S))
    project.mkdir(parents=True)
    for name, text in blocks.items():
        (project / name).write_text(text)
    mp = pytest.MonkeyPatch()
    mp.chdir(project)
    printed: dict[str, str] = {}
    try:
        for line in filter(str.strip, blocks["commands.sh"].splitlines()):
            buf = StringIO()
            with redirect_stdout(buf):
                assert run_line(line, project) == 0, line
            printed[line.split(" #")[0].strip()] = buf.getvalue()
    finally:
        mp.undo()
    return printed


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The page's project, every command of its block run; ``(project, printed output per command)``."""
    assert set(readme_blocks()) == {"mymodels.py", "prepare.py", "attribute.yaml", "commands.sh"}
    project = tmp_path_factory.mktemp("byo") / "project"
    return project, run_readme_example("byo", project)


def reference_scores(project: Path, run: Path) -> np.ndarray:
    """TracIn scores from float64 per-example loop gradients on inputs scaled by hand (/255):
    ``sum_c lr_c <grad f(query), grad f(train)>`` (docs/methods.md section 4), unprojected."""
    import datasets

    sys.path.insert(0, str(project))
    try:
        from mymodels import build
    finally:
        sys.path.remove(str(project))
    from tda.models.tasks import classification_margin

    manifest = json.loads((project / "ckpts" / "tda-checkpoints.json").read_text())
    train = datasets.load_from_disk(str(project / "data" / "train")).with_format("numpy")
    test = datasets.load_from_disk(str(project / "data" / "test")).with_format("numpy")
    with np.load(run / "scores" / "topk.npz") as z:
        qids = z["query_ids"][:4]
    x_tr, y_tr = torch.tensor(np.stack(train["image"][:200]), dtype=torch.float64) / 255, torch.tensor(train["label"][:200])
    x_q, y_q = torch.tensor(np.stack(test["image"][qids]), dtype=torch.float64) / 255, torch.tensor(test["label"][qids])
    out = np.zeros((len(qids), len(y_tr)))
    for entry in manifest["checkpoints"]:
        model = build(64).double()
        model.load_state_dict(torch.load(project / "ckpts" / entry["file"], weights_only=True))

        def grads(x, y):
            rows = []
            for xi, yi in zip(x, y):
                model.zero_grad()
                classification_margin(model(xi[None]), yi[None]).sum().backward()
                rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            return torch.stack(rows)

        out += entry["lr"] * (grads(x_q, y_q) @ grads(x_tr, y_tr).T).numpy()
    return out


def test_every_command_of_the_readme_byo_example_runs(byo_run) -> None:
    project, printed = byo_run
    run = project / "runs" / "my-mlp"
    assert "my-mlp: 2000 training examples, 200 queries, 6 checkpoints" in printed["tda run attribute.yaml"]
    with np.load(run / "scores" / "topk.npz") as z:
        qids = z["query_ids"]
    listed = printed["tda query --run runs/my-mlp --list"]
    assert all(str(int(q)) in listed for q in qids[:10])
    assert "query id 7" in printed["tda query --run runs/my-mlp --example 7 -k 5"]
    new = printed["tda query --run runs/my-mlp --input digit.png --trust-code -k 3"]
    assert re.search(r"query id -1  label \d  predicted \d \(p \d\.\d\d\)", new)  # explained for its predicted class
    validation = json.loads((run / "validation" / "validation.json").read_text())
    assert validation["recipe"]["reproduces"]  # the recorded recipe retrains the model it attributes
    assert validation["recipe"]["correct_retrained"] > 0.8
    curation = json.loads((run / "curation" / "curation.json").read_text())
    assert curation["n_train"] == 2000 and curation["check"]["removed"] == 200
    assert 0.5 < curation["check"]["accuracy"]["flagged"]["mean"] <= 1 and 0.5 < curation["check"]["accuracy"]["random"]["mean"]
    unlearning = json.loads((run / "unlearning" / "unlearning.json").read_text())
    check = unlearning["check"]  # removing the forget set hurts the group more than a random set of the same size
    assert check["forget"]["accuracy"]["group"]["mean"] < check["control"]["accuracy"]["group"]["mean"]
    assert check["spearman_predicted_actual"] > 0.5
    assert (run / "report.html").is_file()


def test_readme_byo_tracin_scores_equal_the_float64_loop_reference(byo_run, monkeypatch) -> None:
    """``score.scorer=tracin`` on the page's config ranks training images as exact TracIn with the
    recorded learning rates on hand-scaled inputs does (k = 256 keeps inner products up to its JL error)."""
    project, _ = byo_run
    monkeypatch.chdir(project)
    assert main(["run", "attribute.yaml", "--set", "score.scorer=tracin", "--out", "runs/tracin", "--quiet"]) == 0
    run = project / "runs" / "tracin"
    ref = reference_scores(project, run)
    scores = np.load(run / "scores" / "scores.npy")[: len(ref), :200]
    from scipy.stats import spearmanr

    for got, want in zip(scores, ref):
        assert spearmanr(got, want).statistic > 0.7  # k = 256 of d = 50,890: a JL estimate of each inner product
        top = set(np.argsort(-want)[:10])
        assert len(top & set(np.argsort(-got)[:20])) >= 6


def test_recorded_learning_rates_reach_tracin(byo_run) -> None:
    project, _ = byo_run
    entries = json.loads((project / "runs" / "my-mlp" / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    assert [e["lr"] for e in entries] == [0.1] * 6 and all(e["sample_accuracy"] > 0.8 for e in entries)


def test_readme_byo_features_equal_those_of_an_explicit_collate(byo_run) -> None:
    """The configured collate (nested uint8 lists, ``data.image_scale: auto``) feeds the model
    exactly what the training code fed it: the stored features equal a Featurizer's on pixels
    divided by 255 by hand (same projection seed), checkpoint by checkpoint."""
    import datasets

    from stores import FeatureStore
    from tda.data.loading import iter_batches
    from tda.featurizers.factored import FactoredFeaturizer
    from tda.core.features import concat_blocks
    from tda.models.tasks import ClassificationTask

    project, _ = byo_run
    run = project / "runs" / "my-mlp"
    sys.path.insert(0, str(project))
    try:
        from mymodels import build
    finally:
        sys.path.remove(str(project))

    def explicit(rows):
        x = np.stack([np.asarray(v, dtype=np.float64) for v in rows["image"]]) / 255.0  # (B, 28, 28)
        return {"x": torch.from_numpy(x.astype(np.float32)), "y": torch.from_numpy(np.asarray(rows["label"], np.int64))}

    block = concat_blocks(list(FeatureStore.open(run / "features-train").iter_blocks()))
    rows = {int(i): r for r, i in enumerate(block.ids)}
    entries = json.loads((run / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    train = datasets.load_from_disk(str(project / "data" / "train")).select(range(64))
    # featurize.projection auto: tensorsketch covers this user MLP (linear layers only), checked on a batch
    assert FeatureStore.open(run / "features-train").manifest["spec"]["projection"] == "tensorsketch"
    feat = FactoredFeaturizer(build(64), ClassificationTask(), k=256, seed=0, projection="tensorsketch")
    for c, entry in enumerate(entries):
        got = [(ids, f) for ids, f, _ in feat.featurize(entry["file"], entry["id"], iter_batches(train, explicit, 32))]
        ids, want = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        stored = block.feats[c][[rows[int(i)] for i in ids]]
        np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_predictions_are_those_of_each_runs_last_checkpoint(byo_run, capsys) -> None:
    """`tda query --list` predicts with the last checkpoint of each recorded run (seed), not an
    average that includes their first epochs: checked against softmax means computed here."""
    import datasets

    from tda.featurizers.predictions import example_predictions
    from tda.models.tasks import ClassificationTask

    project, _ = byo_run
    run = project / "runs" / "my-mlp"
    manifest = json.loads((project / "ckpts" / "tda-checkpoints.json").read_text())
    last = {}
    for entry in manifest["checkpoints"]:
        last[entry["model"]] = project / "ckpts" / entry["file"]
    sys.path.insert(0, str(project))
    try:
        from mymodels import build
    finally:
        sys.path.remove(str(project))

    def collate(rows):
        x = np.stack([np.asarray(v, np.float32) for v in rows["image"]]) / 255.0
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(np.asarray(rows["label"], np.int64))}

    test = datasets.load_from_disk(str(project / "data" / "test"))
    want = example_predictions(build(64), list(last.values()), test, collate, ClassificationTask())
    capsys.readouterr()
    assert main(["query", "--run", str(run), "--list", "--json"]) == 0
    listed = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    for i, c, p in zip(want["ids"], want["predicted"], want["p_predicted"]):
        assert listed[int(i)]["predicted"] == int(c) and abs(listed[int(i)]["p_predicted"] - p) < 1e-4


def test_a_datasets_map_cache_beside_the_data_does_not_invalidate_the_run(byo_run, capsys) -> None:
    """``Dataset.map`` writes cache-*.arrow files into a save_to_disk folder; the run hashes only
    the files the folder's state.json lists, so its answers stay available."""
    import datasets

    project, _ = byo_run
    datasets.load_from_disk(str(project / "data" / "train")).map(lambda r: {"n": 1})
    assert list((project / "data" / "train").glob("cache-*.arrow"))
    capsys.readouterr()
    assert main(["query", "--run", str(project / "runs" / "my-mlp"), "--example", "3", "-k", "2", "--trust-code"]) == 0
    assert "query id 3" in capsys.readouterr().out
