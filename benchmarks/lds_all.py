"""Every LDS table of the docs (docs/benchmarks/) in one run: each family with every scorer, and the anchors.

Runs, in order and each in its own process (every step caches its runs and ground truth under
~/.cache/tda/, outside the repository, so a rerun only re-reads what is done, and an interrupted
run resumes at the step it stopped in):

1. ``benchmarks/families.py``: per family (MNIST MLP, CIFAR-2 CNN, char LM, DDPM with Adam and
   with SGD) every scorer that reads the run's features, classic and small-drop protocols;
2. ``benchmarks/projections.py`` then ``benchmarks/traker_families.py``: tda TRAK (dense and
   the default projection) against MadryLab's ``traker`` and ``dattri`` at equal M and k on the
   same checkpoints and ground truth (MNIST MLP, CIFAR-2 CNN; neither library has a causal-LM
   or diffusion TRAK of its own);
3. ``benchmarks/ekfac_kronfluence.py`` per classifier family: tda EK-FAC (exact and 32 x 32)
   against ``kronfluence`` on the same models and small-drop ground truth;
4. ``benchmarks/lds.py``: TRAK-1/5/10 against traker on the 5,000-image MNIST benchmark (4
   models per subset).

``traker`` is installed with tda; ``dattri`` and ``kronfluence`` are the ``benchmark`` extra,
installed without their dependencies to keep the installed torch: ``pip install --no-deps dattri
kronfluence accelerate einconv einops opt-einsum safetensors``. A first run takes about 2 hours on
2 CPU cores.

    python benchmarks/lds_all.py               # everything
    python benchmarks/lds_all.py --dry-run     # the commands, in order
    python benchmarks/lds_all.py --skip lds    # leave steps out (families, anchors, ekfac, lds)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "tda"
BENCH = ROOT / "benchmarks"
#: classifier configs with an EK-FAC variant for the kronfluence comparison
EKFAC = {"mnist": ("mnist_mlp_ekfac.yaml", "ekfac-lds"), "cifar2": ("cifar2_cnn_ekfac.yaml", "ekfac-cifar2")}


def ekfac_steps(config: str, cache: Path) -> list[list[str]]:
    """tda run + small-drop validate of the 32 x 32 and exact EK-FAC runs on one ground truth,
    then the kronfluence comparison on them."""
    cfg = str(BENCH / "families" / config)
    cli = [sys.executable, "-m", "pipelines.cli.main"]
    exact = ["--set", "featurize.k_in=null", "--set", "featurize.k_out=null"]
    small = ["--set", "validate.protocol=small-drop", "--set", f"validate.ground_truth_dir={cache / 'gt'}"]
    steps = []
    for name, extra in (("k32", []), ("knull", exact)):
        out = ["--out", str(cache / name), "--quiet", *extra]
        steps += [[*cli, "run", cfg, *out], [*cli, "validate", cfg, *out, *small]]
    return steps + [[sys.executable, str(BENCH / "ekfac_kronfluence.py"), "--run-dir", str(cache / "k32"),
                     "--exact-dir", str(cache / "knull"), "--gt", str(cache / "gt"),
                     "--cache", str(cache / "kronfluence")]]


def plan(skip: set[str]) -> list[tuple[str, list[str]]]:
    """(step name, command) in the order they run."""
    py = sys.executable
    steps: list[tuple[str, list[str]]] = []
    if "families" not in skip:
        steps.append(("families", [py, str(BENCH / "families.py")]))
    if "anchors" not in skip:
        steps += [("anchors", [py, str(BENCH / "projections.py"), "--projections", "dense", "sparse"]),
                  ("anchors", [py, str(BENCH / "traker_families.py")])]
    if "ekfac" not in skip:
        for config, folder in EKFAC.values():
            steps += [("ekfac", cmd) for cmd in ekfac_steps(config, CACHE / folder)]
    if "lds" not in skip:
        steps.append(("lds", [py, str(BENCH / "lds.py")]))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    ap.add_argument("--skip", nargs="*", default=[], choices=("families", "anchors", "ekfac", "lds"))
    args = ap.parse_args()
    steps = plan(set(args.skip))
    start = time.time()
    for i, (name, cmd) in enumerate(steps, 1):
        shown = " ".join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[1:])
        print(f"\n=== [{i}/{len(steps)}] {name}: python {shown}", flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True, cwd=ROOT)
    if not args.dry_run:
        print(f"\nall LDS tables done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
