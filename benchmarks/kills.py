"""Kill campaign: SIGKILL `tda run` at seeded random instants, rerun, compare with an uninterrupted run.

Each trial starts from an empty folder or from a finished run of config A, runs an *attempt*
command that is killed (the whole process group, dask workers included) one to three times at a
random instant (most counted from the moment its first stage's progress bar shows, up to its
measured duration less the imports; some anywhere after the imports), then finishes with a plain rerun of either the
attempted configuration or the original one. The finished folder must equal the uninterrupted
run of the finishing configuration made in an empty folder: every file byte-identical (JSON
compared without its ``finished`` timestamp), no file more or less, no lock, no temporary file.

Scenarios (tiny runs with small shards and scoring blocks, so that there are many commit points):

- ``fresh``: empty folder, config A.
- ``from``: finished A rerun with ``--from featurize`` (features, scorer, index, scores deleted, redone).
- ``rescore``: finished A rerun with ``score.lambda_rel=0.1`` (config B); finish with A or B.
- ``requery``: finished A rerun with ``data.query_size=10`` (Q: the query store is deleted and
  rebuilt); finish with A or Q.
- ``overwrite``: finished A rerun with ``featurize.seed=1 --overwrite`` (F: the run folder is
  emptied); finish with A or F, both with ``--overwrite``.
- ``airrep``: empty folder, ``score.scorer=airrep`` (R: representations, the retrain stage's
  subset models, AirRep's head); finish with R.
- ``validate``: ``tda validate`` on finished A (V: ground-truth retrainings, removal retrainings,
  LDS); finish with V.
- ``curate`` / ``unlearn``: ``tda curate`` (C: rankings, the retraining check) and ``tda unlearn``
  (U: the exact check's retrainings, approximate unlearning) on finished A; finish with C / U.
- ``curate-fresh``: ``tda curate`` on an empty folder (it runs ``tda run``'s stages first); finish with C.
- ``unlearn-rescored``: a rescore of A with ``score.lambda_rel=0.1`` is killed, then ``tda unlearn``
  with A's settings finishes (it must rescore with its own settings first).
- config changes between workflows, finished by a sequence of commands and compared with the same
  sequence run without kills: ``curate-changed`` (a killed curate, then curate with another ridge
  and another retraining count, C2), ``curate-unlearn`` (a killed curate, resumed, then unlearn with
  another ridge, U2), ``unlearn-validate`` (a killed unlearn, resumed, then validate),
  ``validate-curate`` (a killed validate, resumed, then C2).

Kills are aimed at the stages: the duration measurement of each scenario records when each progress
bar first shows; most kills pick one of those stages at random and land at a random point of it
(counted from the moment its bar shows), the rest at any instant after the imports.

    python benchmarks/kills.py --kills 200                  # both executors (~30 min on 2 cores)
    python benchmarks/kills.py --kills 20 --executors local
    python benchmarks/kills.py --kills 200 --scenarios workflows    # curate, unlearn, validate, changes

:func:`campaign` is also the CI test's (``tests/test_kill_campaign.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["featurize.shard_size=32", "featurize.batch_size=32", "score.block_rows=4"]
CONFIGS = {"A": [], "B": ["score.lambda_rel=0.1"], "Q": ["data.query_size=10"], "F": ["featurize.seed=1"],
           "R": ["score.scorer=airrep", "score.options={queries: 20, subsets: 4, steps: 30}"],
           "V": ["validate.subsets=6", "validate.plots=false", "validate.removal_queries=2",
                 "validate.removal_ks=[5]"],
           "C": ["curate.retrain_seeds=2"], "U": ["unlearn.retrain_seeds=2"],
           "C2": ["curate.retrain_seeds=3", "score.lambda_rel=0.1"],
           "U2": ["unlearn.retrain_seeds=2", "score.lambda_rel=0.1"]}
#: configs whose command is a workflow on a finished run of A (every other one is ``tda run``)
COMMANDS = {"V": "validate", "C": "curate", "U": "unlearn", "C2": "curate", "U2": "unlearn"}
VALIDATES = set(COMMANDS)
EXECUTORS = {"local": [], "dask": ["executor.kind=dask", "executor.workers=2"]}
#: scenario -> (start state, attempted command, finishing commands: config name and extra flags, or
#: a list of such steps run in order)
SCENARIOS = {
    "fresh": (None, ("A", ()), [("A", ())]),
    "from": ("A", ("A", ("--from", "featurize")), [("A", ())]),
    "rescore": ("A", ("B", ()), [("A", ()), ("B", ())]),
    "requery": ("A", ("Q", ()), [("A", ()), ("Q", ())]),
    "overwrite": ("A", ("F", ("--overwrite",)), [("A", ("--overwrite",)), ("F", ("--overwrite",))]),
    "airrep": (None, ("R", ()), [("R", ())]),
    "validate": ("A", ("V", ()), [("V", ())]),
    "curate": ("A", ("C", ()), [("C", ())]),
    "unlearn": ("A", ("U", ()), [("U", ())]),
    "curate-fresh": (None, ("C", ()), [("C", ())]),  # curate on an empty folder runs tda run's stages first
    "unlearn-rescored": ("A", ("B", ()), [("U", ())]),  # a killed rescore (lambda 0.1), then unlearn (lambda auto)
    "curate-changed": ("A", ("C", ()), [("C2", ())]),
    "curate-unlearn": ("A", ("C", ()), [[("C", ()), ("U2", ())]]),
    "unlearn-validate": ("A", ("U", ()), [[("U", ()), ("V", ())]]),
    "validate-curate": ("A", ("V", ()), [[("V", ()), ("C2", ())]]),
}
#: scenarios whose reference is their own command sequence run without kills (a workflow that runs
#: ``tda run``'s stages records its own config in run.json; the finished run of A records A's)
SEQUENCE_REFS = {"curate-fresh", "unlearn-rescored", "curate-changed", "curate-unlearn", "unlearn-validate",
                 "validate-curate"}
WORKFLOW_SCENARIOS = ("curate", "unlearn", "validate", "curate-fresh", "unlearn-rescored", *sorted(SEQUENCE_REFS - {
    "curate-fresh", "unlearn-rescored"}))
#: the scenarios of configuration changes, query changes and overwrites (the CI test's)
RUN_SCENARIOS = ("fresh", "from", "rescore", "requery", "overwrite")
STAGE_BARS = ("train", "featurize train", "featurize query", "retrain", "index", "score", "validate", "ground truth",
              "curate: retrain", "unlearn: retrain")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
VOLATILE = ("finished",)


def argv(out: Path, config: str, executor: str, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [x for s in BASE + CONFIGS[config] + EXECUTORS[executor] for x in ("--set", s)]
    command = COMMANDS.get(config, "run")
    return [sys.executable, "-m", "pipelines.cli.main", command, TINY, "--out", str(out), *sets, *extra]


def _digest(path: Path) -> str:
    if path.suffix == ".json":
        def strip(obj: Any) -> Any:
            if isinstance(obj, dict):
                return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
            return [strip(v) for v in obj] if isinstance(obj, list) else obj
        try:
            return "json:" + json.dumps(strip(json.loads(path.read_text())), sort_keys=True)
        except ValueError:
            pass
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> digest of every file of a run folder but its lock and input-digest cache."""
    return {p.relative_to(folder).as_posix(): _digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".lock", "inputs.json")}


def differences(folder: Path, reference: dict[str, str], identity: str | None = None) -> list[str]:
    """What differs from ``reference``; with ``identity``, run.json is compared by the run it
    identifies (format and feature fingerprint), not by which command's config last wrote it."""
    got = snapshot(folder)
    diff = [f"missing {k}" for k in reference if k not in got] + [f"extra {k}" for k in got if k not in reference]
    loose = {"run.json"} if identity is not None else set()
    diff += [f"differs {k}" for k in reference if k in got and got[k] != reference[k] and k not in loose]
    if identity is not None and "run.json" in got and _run_identity(folder) != identity:
        diff.append("differs run.json (feature fingerprint)")
    return diff


def _run_identity(folder: Path) -> str:
    record = json.loads((folder / "run.json").read_text())
    return json.dumps([record.get("format"), record.get("feature_fingerprint")])


def run_to_end(cmd: list[str], in_process: bool = False) -> float:
    """Run a ``tda`` command to its end; its wall time. ``in_process``: through ``pipelines.cli.main.main``
    on one torch thread, as the subprocesses run (no import time: the caller adds it)."""
    t = time.time()
    if in_process:
        import torch

        from pipelines.cli.main import main as tda_main

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rc = tda_main([*cmd[3:], "--quiet"])
        finally:
            torch.set_num_threads(threads)
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd[3:])} failed in process (rc {rc})")
        return time.time() - t
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return time.time() - t


def last_stage(stderr: Path) -> str:
    """The stage whose progress bar the killed process showed last ("startup" before any)."""
    text = stderr.read_text(errors="replace").replace("\r", "\n")
    stage = "startup"
    for line in text.splitlines():
        for name in STAGE_BARS:
            if line.startswith(name + ":") or line.startswith(name + " "):
                stage = name
    return stage


def _wait_for(proc: subprocess.Popen, log: Path, stages: tuple[str, ...]) -> None:
    """Wait until the process shows one of ``stages``' bars (or ends)."""
    while proc.poll() is None and last_stage(log) not in stages:
        time.sleep(0.01)


def attempt(cmd: list[str], delay: float, log: Path, aim: tuple[str, ...] = ()) -> str | None:
    """Run ``cmd``, SIGKILL its process group after ``delay`` s; the stage it was in, or None if it
    finished first (a failure is raised). ``aim``: the delay counts from the moment one of these
    stages' progress bars shows (the target stage, then the ones after it), not from the start, so
    that the kill lands inside that stage whatever the machine's import time."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        if aim:
            _wait_for(proc, log, aim)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return last_stage(log)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed before the kill (rc {proc.returncode}):\n"
                           f"{log.read_text()[-3000:]}")
    return None


def timeline(cmd: list[str], log: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run ``cmd`` to its end, polling its progress bars: its wall time and each stage it showed
    with the time it lasted (from its bar's first showing to the next stage's or the end)."""
    t0 = time.time()
    seen: list[tuple[str, float]] = []
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        while proc.poll() is None:
            stage = last_stage(log)
            if stage != "startup" and (not seen or seen[-1][0] != stage):
                seen.append((stage, time.time() - t0))
            time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed (rc {proc.returncode}):\n{log.read_text()[-3000:]}")
    total = time.time() - t0
    ends = [t for _, t in seen[1:]] + [total]
    return total, [(name, max(0.05, end - start)) for (name, start), end in zip(seen, ends)]


def _steps(finish: Any) -> list[tuple[str, tuple[str, ...]]]:
    """A finishing entry as a list of (config, flags) steps."""
    return list(finish) if isinstance(finish, list) else [finish]


def _name(finish: Any) -> str:
    return "+".join(c for c, _ in _steps(finish))


class Campaign:
    """References per (config, executor), durations per (scenario, executor), then trials."""

    def __init__(self, work: Path, executors: list[str], seed: int, in_process: bool = False,
                 scenarios: list[str] | None = None) -> None:
        self.work, self.executors, self.rng, self.in_process = work, executors, random.Random(seed), in_process
        self.scenarios = list(scenarios or SCENARIOS)
        self.refs: dict[tuple[str, str], dict[str, str]] = {}
        self.finished: dict[str, Path] = {}
        self.duration: dict[tuple[str, str], float] = {}
        self.stages: dict[tuple[str, str], list[tuple[str, float]]] = {}
        self.kills: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.trials = 0
        self.startup = 0.0

    def prepare(self) -> None:
        """References of every config (in empty folders) and each scenario's attempt duration."""
        self.startup = run_to_end([sys.executable, "-m", "pipelines.cli.main", "--help"])  # imports only
        for ex in self.executors:
            needed = {"A"} | {c for s in self.scenarios for c in [SCENARIOS[s][1][0]]
                              + [c for f in SCENARIOS[s][2] for c, _ in _steps(f)]}
            for name in sorted(needed, key=lambda c: c in VALIDATES):  # validations after A
                out = self.work / f"ref-{name}-{ex}"
                if name in VALIDATES:
                    shutil.copytree(self.work / f"ref-A-{ex}", out)
                run_to_end(argv(out, name, ex), self.in_process)
                self.refs[name, ex] = snapshot(out)
            self.finished[ex] = self.work / f"ref-A-{ex}"
            for scenario in set(self.scenarios) & SEQUENCE_REFS:  # their reference: the same commands, unkilled
                start, (config, extra), finishes = SCENARIOS[scenario]
                for finish in finishes:
                    out = self._start(scenario, ex, start)
                    run_to_end(argv(out, config, ex, extra), self.in_process)
                    for step, flags in _steps(finish):
                        run_to_end(argv(out, step, ex, flags), self.in_process)
                    self.refs[scenario, _name(finish), ex] = (snapshot(out), _run_identity(out))
                    shutil.rmtree(out)
            for scenario in self.scenarios:
                start, (config, extra), _ = SCENARIOS[scenario]
                out = self._start(scenario, ex, start)
                if self.in_process:
                    self.duration[scenario, ex] = run_to_end(argv(out, config, ex, extra), True) + self.startup
                else:
                    self.duration[scenario, ex], self.stages[scenario, ex] = timeline(
                        argv(out, config, ex, extra), self.work / "timeline.log")
                shutil.rmtree(out)

    def _start(self, scenario: str, ex: str, start: str | None) -> Path:
        out = self.work / f"trial-{scenario}-{ex}"
        if out.exists():
            shutil.rmtree(out)
        if start is not None:
            shutil.copytree(self.finished[ex], out)
        return out

    def _aim(self, scenario: str, ex: str) -> tuple[float, tuple[str, ...]]:
        """A kill's delay and the stages it counts from: mostly a random point of a random stage of
        the measured timeline (from the first stage's bar when none was measured: in-process runs),
        else any instant after 0.8 x the imports (a kill during the imports tests nothing)."""
        stages = self.stages.get((scenario, ex))
        if self.rng.random() < 0.2:
            return self.rng.uniform(0.8 * self.startup, self.duration[scenario, ex]), ()
        if not stages:
            return self.rng.uniform(0.0, max(0.1, self.duration[scenario, ex] - self.startup)), STAGE_BARS
        i = self.rng.randrange(len(stages))
        return self.rng.uniform(0.0, stages[i][1]), tuple(name for name, _ in stages[i:])

    def trial(self, scenario: str, ex: str, kills: int) -> int:
        """One trial; returns the kills made."""
        start, (config, extra), finishes = SCENARIOS[scenario]
        out = self._start(scenario, ex, start)
        made = 0
        for _ in range(kills):
            delay, aim = self._aim(scenario, ex)
            try:
                stage = attempt(argv(out, config, ex, extra), delay, self.work / "attempt.log", aim)
            except RuntimeError as exc:  # a rerun that cannot resume what a kill left: a failed trial
                self.trials += 1
                self.failures.append({"scenario": scenario, "executor": ex, "finish": "(attempt)", "kills": made,
                                      "differences": [str(exc)[-600:]]})
                shutil.rmtree(out)
                return made
            if stage is None:
                break
            made += 1
            self.kills.append({"scenario": scenario, "executor": ex, "stage": stage, "delay": round(delay, 2),
                               "aimed": aim[0] if aim and aim != STAGE_BARS else None})
        finish = self.rng.choice(finishes)
        self.trials += 1
        try:
            for step, flags in _steps(finish):
                run_to_end(argv(out, step, ex, flags), self.in_process)
            own = self.refs.get((scenario, _name(finish), ex))
            diff = differences(out, *own) if own else differences(out, self.refs[_name(finish), ex])
        except RuntimeError as exc:
            diff = [str(exc)]
        if diff:
            self.failures.append({"scenario": scenario, "executor": ex, "finish": _name(finish), "kills": made,
                                  "differences": diff[:10]})
        shutil.rmtree(out)
        return made

    def run(self, total: int, progress: Path | None = None) -> None:
        """Trials round-robin over (scenario, executor) until ``total`` kills, each pair killed at least
        once; ``progress``: the summary so far is rewritten there after every trial."""
        pairs = [(s, ex) for ex in self.executors for s in self.scenarios]
        i = 0
        while (len(self.kills) < total or self._unkilled(pairs)) and i < 20 * max(total, len(pairs)):
            scenario, ex = pairs[i % len(pairs)]
            self.trial(scenario, ex, self.rng.randint(1, 3))
            i += 1
            if progress is not None:
                progress.write_text(json.dumps({**self.summary(), "finished": False}, indent=1))

    def _unkilled(self, pairs: list[tuple[str, str]]) -> bool:
        return bool(set(pairs) - {(k["scenario"], k["executor"]) for k in self.kills})

    def summary(self) -> dict[str, Any]:
        by = Counter((k["executor"], k["scenario"]) for k in self.kills)
        stages = Counter((k["executor"], k["stage"]) for k in self.kills)
        aimed = Counter(k["aimed"] for k in self.kills if k.get("aimed"))
        return {"kills": len(self.kills), "trials": self.trials, "failures": self.failures,
                "by_scenario": {f"{e}/{s}": n for (e, s), n in sorted(by.items())},
                "by_stage": {f"{e}/{s}": n for (e, s), n in sorted(stages.items())},
                "aimed_at": dict(sorted(aimed.items()))}


def campaign(kills: int, executors: list[str], seed: int = 0, work: Path | None = None,
             in_process: bool = False, scenarios: list[str] | None = None,
             progress: Path | None = None) -> dict[str, Any]:
    """Run a campaign of at least ``kills`` kills; its :meth:`Campaign.summary`. ``in_process``: the
    uninterrupted runs go through ``pipelines.cli.main.main`` here (faster; the killed ones never do);
    ``progress``: a file the summary so far is written to after every trial."""
    with tempfile.TemporaryDirectory(prefix="tda-kills-") as tmp:
        c = Campaign(Path(work or tmp), executors, seed, in_process, scenarios)
        c.prepare()
        c.run(kills, progress)
        return c.summary()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--executors", default="local,dask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated subset of the scenarios, or 'workflows' (curate, unlearn, validate and "
                        "the config changes between them)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    a = p.parse_args()
    t = time.time()
    scenarios = list(WORKFLOW_SCENARIOS) if a.scenarios == "workflows" else a.scenarios.split(",")
    result = campaign(a.kills, a.executors.split(","), a.seed, scenarios=scenarios, progress=a.json)
    result["seconds"] = round(time.time() - t)
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(f"\n{result['kills']} kills in {result['trials']} trials, {len(result['failures'])} failed trials, "
          f"{result['seconds']} s")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
