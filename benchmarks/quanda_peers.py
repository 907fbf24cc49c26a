"""Importing quanda, and the peer explainers ``benchmarks/quanda.py`` measures in the same run:
Quanda's ``TRAK`` wrapper (traker, the last checkpoint), Captum's ``TracInCPFast`` (last layer,
loss gradients, all checkpoints) and Quanda's ``RandomExplainer``."""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

import quanda_setups as S


def import_quanda() -> Any:
    """``import quanda``, with the PyPI torchvision wheel on a CPU-only torch: that wheel's C ops
    link CUDA torch and do not load, and torchvision >= 0.20 then fails registering fake kernels
    for ``torchvision::nms`` / ``qnms`` (``operator ... does not exist``). Declaring the two
    operators first lets it import; nothing here calls them (quanda only imports torchvision)."""
    try:
        importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        print("torchvision's C ops do not load on this torch; declared nms/qnms to import it", file=sys.stderr)
    from tda.integrations.quanda import INSTALL

    try:
        module = importlib.import_module("quanda")
    except ImportError as exc:
        raise SystemExit(f"benchmarks/quanda.py needs quanda: {INSTALL} ({exc})") from exc
    if not hasattr(module, "__path__"):  # this folder's quanda.py, not the package
        raise SystemExit(f"benchmarks/quanda.py needs quanda: {INSTALL}")
    return module


def peer_explanations(src: S.Source, args: Any) -> Callable[[str, S.Setup, list], dict[str, torch.Tensor]]:
    """``peers(kind, setup, states)``: name -> explanations of the setup's queries (``kind ==
    "mislabel"``: name -> self-influence of every training row)."""
    from quanda.explainers import RandomExplainer
    from quanda.explainers.wrappers import TRAK, CaptumTracInCPFast

    def peers(kind: str, setup: S.Setup, states: list) -> dict[str, torch.Tensor]:
        out = {}
        data = torch.utils.data.TensorDataset(setup.x, setup.y)
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i, st in enumerate(states):
                files.append(str(Path(tmp) / f"model{i}.pt"))
                torch.save(st, files[-1])
            model = S.model_for(src, states[-1])
            captum = CaptumTracInCPFast(model=model, final_fc_layer=model[-1], train_dataset=data,
                                        checkpoints=files, batch_size=64, device="cpu")
            if kind == "mislabel":
                return {"Captum TracInCPFast": captum.self_influence(batch_size=64).detach().cpu()}
            out["Captum TracInCPFast"] = captum.explain(setup.qx, setup.qt).detach().cpu()
            trak = TRAK(model=S.model_for(src, states[-1]), train_dataset=data, model_id=f"{kind}", cache_dir=tmp,
                        checkpoints=files[-1:], proj_dim=args.k, batch_size=64, load_from_disk=False)
            out["Quanda TRAK (traker)"] = trak.explain(setup.qx, setup.qt).detach().cpu()
            rand = RandomExplainer(model=model, train_dataset=data)
            out["random"] = rand.explain(setup.qx, setup.qt).detach().cpu()
        return out

    return peers


__all__ = ["import_quanda", "peer_explanations"]
