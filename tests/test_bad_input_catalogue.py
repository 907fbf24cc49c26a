"""Bad-input catalogue (issue 11): every input that reaches a parser or the file system.

Each case is one row of a table: an id, a setup that prepares the bad input and returns the
``tda`` command line, the exact :mod:`tda.errors` class ``tda`` must name (exit status 2), and
words the message must hold: the problem (the key, file or folder) and the fix. A case that
touches a finished run compares the sha256 of every file in it before and after; one that
writes into a new folder must leave no file there (but the claim of the folder). This file
holds the config, file system and run-folder cases; ``test_bad_input_data.py`` the data files,
checkpoints and diverging training.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from pipelines.run import CLAIM_FILES
from tda import errors as E
from test_reliability import cli_error, snapshot

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[SimpleNamespace], list[str]]  # prepares the bad input, returns the argv of `tda`
    error: type[E.TDAError]
    words: tuple[str, ...]  # the problem and the fix, as the message must say them
    writes: bool = False  # may leave files in a new run folder (work finished before the error)


def check_case(case: Case, ctx: SimpleNamespace, capsys) -> None:
    """Run one case: exact class, message words, stored data unchanged, nothing half-written."""
    argv = case.setup(ctx)
    before = _stored(ctx.watch) if ctx.watch else None
    name, msg = cli_error(argv, capsys)
    assert name == case.error.__name__, f"{name}: {msg}"
    missing = [w for w in case.words if w not in msg]
    assert not missing, f"{missing} not in {name}: {msg}"
    assert "Traceback" not in msg
    if ctx.watch:
        assert _stored(ctx.watch) == before, "stored data changed"
    if not case.writes and ctx.out.exists():  # at most the claim of the folder (run.json, inputs.json)
        left = [p for p in ctx.out.rglob("*") if p.is_file() and p.name not in CLAIM_FILES]
        assert not left, f"files left in the new run folder: {left}"


def _stored(folder: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(folder).items() if Path(k).name != ".lock"}


def make_ctx(tmp_path: Path, monkeypatch, finished: Path | None) -> SimpleNamespace:
    """What a setup may use: a private folder, a new run folder, monkeypatch, the finished run."""
    ctx = SimpleNamespace(tmp=tmp_path, out=tmp_path / "out", mp=monkeypatch, watch=None)

    def shared() -> Path:  # the finished run, untouched by the setup
        ctx.watch = finished
        return finished

    def copy() -> Path:  # a private copy the setup may damage
        ctx.watch = tmp_path / "run"
        shutil.copytree(finished, ctx.watch)
        return ctx.watch

    ctx.shared, ctx.copy = shared, copy
    return ctx


def new_run(ctx: SimpleNamespace, *sets: str, config: str = TINY) -> list[str]:
    """``tda run CONFIG --out NEW --set ...``."""
    return ["run", str(config), "--out", str(ctx.out), "--quiet", *(a for s in sets for a in ("--set", s))]


def write(ctx: SimpleNamespace, name: str, content: str | bytes) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def os_refuses(ctx: SimpleNamespace, folder: Path, err: int, what: str = "write") -> None:
    """Simulate a folder the OS refuses (we run as root, so chmod would not): creating, writing or
    (``what="read"``) opening anything under ``folder`` fails with ``err`` at the os-level call."""
    real_open, real_mkdir, real_io_open = os.open, os.mkdir, io.open
    folder = str(folder)

    def inside(path) -> bool:
        return str(path) == folder or str(path).startswith(folder + os.sep)

    def refuse(path):
        raise OSError(err, os.strerror(err), str(path))

    def os_open(path, flags, *a, **k):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if inside(path) and (writing or what == "read"):
            refuse(path)
        return real_open(path, flags, *a, **k)

    def py_open(file, mode="r", *a, **k):
        if isinstance(file, (str, Path)) and inside(file) and (what == "read" or set(mode) & set("wax+")):
            refuse(file)
        return real_io_open(file, mode, *a, **k)

    def mkdir(path, *a, **k):
        if inside(path):
            refuse(path)
        return real_mkdir(path, *a, **k)

    ctx.mp.setattr(os, "open", os_open)
    ctx.mp.setattr(os, "mkdir", mkdir)
    ctx.mp.setattr(io, "open", py_open)
    ctx.mp.setattr(builtins, "open", py_open)


def fail_at(ctx: SimpleNamespace, name: str, err: int) -> None:
    """Make ``os.<name>`` fail with ``err`` (a full disk: ENOSPC, a quota: EDQUOT)."""
    def full(*a, **k):
        raise OSError(err, os.strerror(err))

    ctx.mp.setattr(os, name, full)


# ------------------------------------------------------------------------- config: --set and YAML
def _set(id_: str, override: str, *words: str) -> Case:
    return Case(f"set-{id_}", lambda ctx: new_run(ctx, override), E.ConfigError, words)


def _yaml(id_: str, text: str | bytes, *words: str) -> Case:
    return Case(f"yaml-{id_}", lambda ctx: new_run(ctx, config=str(write(ctx, "bad.yaml", text))), E.ConfigError,
                words)


CONFIG_CASES = [
    _set("int-given-word", "train.epochs=two", "train.epochs must be of type int", "'two'"),
    _set("int-given-float", "data.train_size=1.5", "data.train_size must be of type int"),
    _set("int-zero", "train.batch_size=0", "train.batch_size must be >= 1", "got 0"),
    _set("int-negative", "featurize.shard_size=-5", "featurize.shard_size must be >= 1"),
    _set("seed-negative", "featurize.seed=-1", "featurize.seed must be >= 0"),
    _set("size-zero", "data.query_size=0", "data.query_size must be >= 1"),
    _set("float-given-word", "train.lr=fast", "train.lr must be of type float", "'fast'"),
    _set("float-negative", "train.lr=-0.1", "train.lr must be > 0"),
    _set("float-zero", "score.lambda_rel=0", "score.lambda_rel must be 'auto' or a positive finite number"),
    _set("fraction-above-one", "score.influential_fraction=1.5", "score.influential_fraction", "[0, 1)"),
    _set("alpha-above-one", "validate.alpha=2", "validate.alpha", "(0, 1)"),
    _set("bool-given-word", "score.dense=maybe", "score.dense must be of type bool"),
    _set("bool-given-int", "validate.plots=1", "validate.plots must be of type bool"),
    _set("str-given-list", "name=[a, b]", "name must be of type str"),
    _set("list-given-str", "featurize.params=layer1", "featurize.params must be a list"),
    _set("list-negative-item", "model.hidden=[16, -1]", "model.hidden", "positive widths"),
    _set("list-empty", "model.hidden=[]", "model.hidden", "non-empty"),
    _set("list-zero-item", "validate.lambda_grid=[0.1, 0]", "validate.lambda_grid must hold positive values"),
    _set("list-item-word", "validate.removal_ks=[10, many]", "validate.removal_ks[] must be of type int"),
    _set("dict-given-int", "model.options=5", "model.options must be a mapping"),
    _set("dict-unknown-option", "model.options={width: 3}", "model.options", "width", "remove"),
    _set("scorer-options-unknown", "score.options={metric: cos}", "score.options", "metric"),
    _set("choice-projector", "featurize.projector=uniform", "featurize.projector", "choose one of"),
    _set("choice-index", "index.kind=annoy", "index.kind", "'hnsw'"),
    _set("choice-executor", "executor.kind=ray", "executor.kind", "'dask'"),
    _set("choice-subset", "data.subset=last", "data.subset", "'first'"),
    _set("choice-split", "data.query_split=val", "data.query_split", "'test'"),
    _set("choice-device", "featurize.device=tpu", "featurize.device", "'cpu'"),
    _set("choice-scorer", "score.scorer=datamodels", "score.scorer", "trak"),
    _set("choice-arch", "model.arch=transformer", "model.arch", "choose one of"),
    _set("choice-family", "model.family=rnn", "model.family", "classifier"),
    _set("choice-data-name", "data.name=imagenet", "data.name", "mnist"),
    _set("unknown-key", "train.learning_rate=0.1", "unknown config key 'train.learning_rate'", "known keys"),
    _set("unknown-section", "optimizer.lr=0.1", "unknown config key 'optimizer'"),
    _set("section-to-scalar", "train=5", "train must be a mapping"),
    _set("key-below-a-value", "featurize.k.x=1", "featurize.k.x", "not a section"),
    _set("without-equals", "featurize.k", "'featurize.k'", "section.key=value"),
    _set("unparsable-value", "featurize.k=[1,", "not a YAML value", "quote"),
    _set("empty-key", "=5", "section.key=value"),
    _set("checkpoints-given-int", "model.checkpoints=5", "model.checkpoints must be a path, a glob or a list"),
    _set("checkpoints-empty-list", "model.checkpoints=[]", "model.checkpoints is an empty list"),
    _set("nlist-zero", "index.nlist=0", "index.nlist must be >= 1"),
    _set("workers-zero", "executor.workers=0", "executor.workers must be >= 1"),
    _set("show-negative", "score.show=-1", "score.show must be >= 0"),
    _set("removal-negative", "validate.removal_queries=-1", "validate.removal_queries must be >= 0"),
    _yaml("top-level-list", "- data\n- model\n", "mapping of sections", "got a list"),
    _yaml("top-level-scalar", "just words\n", "mapping of sections", "got a str"),
    _yaml("unparsable", "data: [1, 2\nmodel: {\n", "bad.yaml is not valid YAML"),
    _yaml("section-scalar", "featurize: 64\n", "featurize must be a mapping"),
    _yaml("unknown-section", "optimiser:\n  lr: 0.1\n", "unknown config key 'optimiser'"),
    _yaml("list-given-mapping", "model:\n  hidden: {a: 1}\n", "model.hidden must be a list"),
    _yaml("not-text", b"\xff\xfe\x00\x81garbage\x00", "bad.yaml cannot be read", "UTF-8"),
    Case("config-missing", lambda ctx: new_run(ctx, config=str(ctx.tmp / "nowhere.yaml")), E.ConfigError,
         ("nowhere.yaml does not exist", "check the path")),
    Case("config-is-a-folder", lambda ctx: new_run(ctx, config=str(ctx.tmp)), E.ConfigError,
         ("is a folder", "YAML file")),
]


# ------------------------------------------------------------------------- the file system
def _ro_parent(ctx) -> list[str]:
    os_refuses(ctx, ctx.tmp / "ro", errno.EACCES)
    return ["run", TINY, "--out", str(ctx.tmp / "ro" / "run"), "--quiet"]


def _refused_out(err: int) -> Callable[[SimpleNamespace], list[str]]:
    def setup(ctx) -> list[str]:
        ctx.out.mkdir()
        os_refuses(ctx, ctx.out, err)
        return new_run(ctx)

    return setup


def _refused_run(command: str) -> Callable[[SimpleNamespace], list[str]]:
    def setup(ctx) -> list[str]:
        run = ctx.shared()
        os_refuses(ctx, run, errno.EACCES)
        return [command, TINY, "--out", str(run), "--quiet", *(["--set", "score.lambda_rel=0.5"] * (command == "run"))]

    return setup


def _refused_ground_truth(ctx) -> list[str]:
    run, gt = ctx.shared(), ctx.tmp / "shared-gt"
    os_refuses(ctx, gt, errno.EACCES)
    return ["validate", TINY, "--out", str(run), "--quiet", "--set", f"validate.ground_truth_dir={gt}",
            "--set", "validate.subsets=2"]


def _disk_full(call: str, err: int) -> Callable[[SimpleNamespace], list[str]]:
    def setup(ctx) -> list[str]:
        fail_at(ctx, call, err)
        return new_run(ctx)

    return setup


def _no_inodes(ctx) -> list[str]:
    """A file system out of inodes: the lock file exists, creating any other file fails."""
    ctx.out.mkdir()
    (ctx.out / ".lock").touch()
    real = os.open

    def os_open(path, flags, *args):
        if flags & os.O_CREAT and Path(path).name != ".lock":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, flags, *args)

    ctx.mp.setattr(os, "open", os_open)
    return new_run(ctx)


def _unreadable_config(ctx) -> list[str]:
    config = write(ctx, "cfg.yaml", "name: x\n")
    os_refuses(ctx, config, errno.EACCES, "read")
    return new_run(ctx, config=str(config))


FS_CASES = [
    Case("out-is-a-file", lambda ctx: new_run(ctx) if ctx.out.write_text("x") else [], E.ForeignStoreError,
         ("out is an existing file", "pass --out a folder")),
    Case("out-below-a-file", lambda ctx: ["run", TINY, "--out", str(write(ctx, "f", "x") / "run")], E.StoreError,
         ("cannot create the run folder", "f/run", "writable --out")),
    Case("out-parent-read-only", _ro_parent, E.StoreError, ("cannot create the run folder", "ro/run", "writable")),
    Case("out-read-only", _refused_out(errno.EACCES), E.StoreError, ("cannot write", "out/.lock", "read-only",
                                                                      "choose a folder you can write to")),
    Case("out-read-only-fs", _refused_out(errno.EROFS), E.StoreError, ("Read-only file system", "make it writable")),
    Case("rerun-read-only-run", _refused_run("run"), E.StoreError, ("cannot write", ".lock", "writable")),
    Case("validate-read-only-run", _refused_run("validate"), E.StoreError, ("cannot write", ".lock", "writable")),
    Case("validate-read-only-ground-truth", _refused_ground_truth, E.StoreError,
         ("cannot write", "shared-gt", "writable")),
    Case("disk-full-at-fsync", _disk_full("fsync", errno.ENOSPC), E.StoreError,
         ("the disk is full writing", "run.json", "free space")),
    Case("disk-quota-at-replace", _disk_full("replace", errno.EDQUOT), E.StoreError,
         ("the disk is full writing", "quota", "free space")),
    Case("disk-out-of-inodes", _no_inodes, E.StoreError,
         ("the disk is full writing", "run.json", "No space left", "free space")),
    Case("config-unreadable", _unreadable_config, E.ConfigError, ("permission denied reading", "cfg.yaml",
                                                                  "make it readable")),
]


# ------------------------------------------------------------------------- run folders
def _query(*extra: str, damage: Callable[[Path], object] | None = None):
    def setup(ctx) -> list[str]:
        run = ctx.copy() if damage else ctx.shared()
        if damage:
            damage(run)
        return ["query", "--run", str(run), *extra]

    return setup


def _validate(damage: Callable[[Path], object] | None = None, *sets: str):
    def setup(ctx) -> list[str]:
        run = ctx.copy() if damage else ctx.shared()
        if damage:
            damage(run)
        return ["validate", TINY, "--out", str(run), "--quiet", *(a for s in sets for a in ("--set", s))]

    return setup


def _keep(*names: str) -> Callable[[Path], None]:
    """Damage: delete every output of the run but run.json and ``names`` (an unfinished run)."""
    def damage(run: Path) -> None:
        for child in run.iterdir():
            if child.is_dir() and child.name not in names:
                shutil.rmtree(child)

    return damage


def _pending_shard(run: Path) -> None:
    manifest = run / "features-train" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["complete"] = {k: v for k, v in m["complete"].items() if not k.endswith("/1/2")}
    manifest.write_text(json.dumps(m))


def _run_json(text: str) -> Callable[[Path], None]:
    return lambda run: (run / "run.json").write_text(text)


def _bad_recorded_config(run: Path) -> None:
    record = json.loads((run / "run.json").read_text())
    record["config"]["featurize"]["k"] = "many"
    (run / "run.json").write_text(json.dumps(record))


RUN_CASES = [
    Case("query-not-a-run", lambda ctx: ["query", "--run", str(ctx.tmp), "--example", "1"], E.ForeignStoreError,
         ("is not a tda run folder", "tda run CONFIG --out")),
    Case("query-missing-folder", lambda ctx: ["query", "--run", str(ctx.tmp / "nowhere"), "--example", "1"],
         E.ForeignStoreError, ("nowhere does not exist", "tda run CONFIG --out")),
    Case("query-train-only-run", _query("--example", "1", damage=_keep("checkpoints")), E.StoreError,
         ("unfinished run", "features-train/ (no features)", "scorer/ (no fitted scorer)",
          "complete it with `tda run")),
    Case("query-no-index", _query("--example", "1", damage=_keep("checkpoints", "features-train", "features-query",
                                                                  "scorer")), E.StoreError,
         ("unfinished run: index/ (no index)", "complete it with `tda run CONFIG --out")),
    Case("query-negative-id", _query("--example", "-1"), E.QueryError, ("[-1]", "not in the query split",
                                                                       "pick an id from that range")),
    Case("query-unknown-train-id", _query("--example", "5000", "--split", "train"), E.QueryError,
         ("[5000]", "train split", "pick an id", "raise data.train_size")),
    Case("query-k-too-large", _query("--example", "1", "-k", "1000"), E.QueryError,
         ("-k must be between 1 and the 300", "got 1000")),
    Case("query-run-json-a-list", _query("--example", "1", damage=_run_json("[1, 2]")), E.ForeignStoreError,
         ("run.json was not written by `tda run`", "choose another folder")),
    Case("query-run-json-bad-config", _query("--example", "1", damage=_bad_recorded_config), E.StoreCorruptError,
         ("run.json", "featurize.k", "rerun")),
    Case("validate-not-a-run", lambda ctx: ["validate", TINY, "--out", str(write(ctx, "notes/todo.txt", "x").parent),
                                            "--quiet"], E.ForeignStoreError,
         ("is not a tda run folder", f"tda run {TINY} --out")),
    Case("validate-run-json-truncated", _validate(_run_json('{"format": "tda-')), E.StoreCorruptError,
         ("run.json is not valid JSON", "restore it")),
    Case("validate-other-config", _validate(None, "featurize.k=32"), E.FingerprintMismatchError,
         ("another configuration", "featurize.k 32 here, 64 in the run", "use the config and --set options")),
]
CASES = FS_CASES + RUN_CASES


#: Cases whose ids start so work on the finished run (the others never build it).
RUN_PREFIXES = ("query-", "validate-", "rerun-")
assert len({c.id for c in CONFIG_CASES + CASES}) == len(CONFIG_CASES + CASES), "case ids must be distinct"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished tiny run (configs/tiny.yaml, shipped MNIST), shared by the cases of this module."""
    out = tmp_path_factory.mktemp("catalogue") / "tiny"
    from pipelines.cli.main import main

    assert main(["run", TINY, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def ctx(tmp_path, monkeypatch, request) -> SimpleNamespace:
    needs_run = request.node.callspec.params["case"].id.startswith(RUN_PREFIXES)
    return make_ctx(tmp_path, monkeypatch, request.getfixturevalue("finished") if needs_run else None)


@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.id)
def test_bad_config(case, ctx, capsys):
    check_case(case, ctx, capsys)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_files_and_runs(case, ctx, capsys):
    check_case(case, ctx, capsys)
