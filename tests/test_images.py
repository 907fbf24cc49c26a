"""Image columns in every storage form reach the model through exactly the stated transforms
(tda/data/images.py, the user family's ColumnsCollate), compared with an explicit reference; a
mis-scaled input and a wrong layout are refused before featurizing with the key that fixes them."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipelines.cli.main import main
from pipelines.families.user import ColumnsCollate
from tda.data.loading import arrow_columns
from tda.errors import DataError
from tda.data.images import display_image, image_batch, infer_layout

GEN = np.random.default_rng(0)
HWC = GEN.integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)  # 4 images, H 6, W 5, RGB
CHW_REF = HWC.transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # what a PyTorch CNN reads


def _through_arrow(column) -> object:
    """The column as a collate receives it from a save_to_disk / parquet data set (arrow format)."""
    table = datasets.Dataset.from_dict({"image": column}).with_format("arrow")[:]
    return arrow_columns(table)["image"]


@pytest.mark.parametrize("form", ["nested-lists", "numpy-stack", "object-array", "arrow", "pil", "png-bytes"])
def test_every_storage_form_gives_the_explicit_reference(form: str) -> None:
    if form == "nested-lists":
        values = HWC.tolist()
    elif form == "numpy-stack":
        values = HWC
    elif form == "object-array":
        values = np.empty(len(HWC), dtype=object)
        values[:] = [img for img in HWC]
    elif form == "arrow":
        values = _through_arrow(HWC.tolist())
    elif form == "pil":
        values = [Image.fromarray(img) for img in HWC]
    else:
        buf = []
        for img in HWC:
            b = io.BytesIO()
            Image.fromarray(img).save(b, format="PNG")
            buf.append({"bytes": b.getvalue(), "path": None})
        values = buf
    np.testing.assert_array_equal(image_batch(values, "auto", "auto"), CHW_REF)


def test_layouts_scales_and_grey_images() -> None:
    chw = HWC.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(image_batch(chw.tolist(), "auto", "auto"), CHW_REF)  # stored CHW: kept
    np.testing.assert_array_equal(image_batch(HWC, "HWC", 255), CHW_REF)
    np.testing.assert_array_equal(image_batch(HWC, "stored", "none"), HWC.astype(np.float32))
    floats = HWC.astype(np.float32) / 255.0
    np.testing.assert_array_equal(image_batch(floats, "auto", "auto"), CHW_REF)  # floats: not divided again
    grey = HWC[..., 0]
    np.testing.assert_array_equal(image_batch(grey.tolist(), "auto", "auto"), grey.astype(np.float32) / 255.0)
    with pytest.raises(DataError, match="data.image_layout"):
        infer_layout((3, 8, 3))  # channels first or last: ambiguous
    np.testing.assert_array_equal(image_batch(grey, "CHW", "auto"), grey[:, None].astype(np.float32) / 255.0)
    with pytest.raises(DataError, match="data.image_layout is 'HWC'"):
        image_batch(grey[:, 0], "HWC", "auto")  # flat rows: no channel to give


def test_columns_collate_reads_what_the_config_states() -> None:
    rows = {"image": _through_arrow(HWC.tolist()), "label": np.array([0, 1, 2, 1])}
    out = ColumnsCollate("image", "label")(rows)
    np.testing.assert_array_equal(out["x"].numpy(), CHW_REF)
    assert out["y"].tolist() == [0, 1, 2, 1] and out["y"].dtype == torch.int64
    raw = ColumnsCollate("image", "label", "stored", "none")(rows)["x"].numpy()
    np.testing.assert_array_equal(raw, HWC.astype(np.float32))


def test_display_image_returns_the_stored_picture() -> None:
    for value, layout in ((HWC[0].tolist(), "auto"), (HWC[0].transpose(2, 0, 1), "CHW"),
                          (Image.fromarray(HWC[0]), "auto")):
        np.testing.assert_array_equal(display_image(value, layout), HWC[0])


# ------------------------------------------------------------------ refusals before featurizing
CNN = '''
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))
'''


def _colour_project(tmp_path: Path) -> Path:
    """A user CNN trained on colour images stored HWC (red-dominant = class 1), with its checkpoint."""
    gen = np.random.default_rng(1)
    x = gen.integers(0, 120, size=(200, 8, 8, 3), dtype=np.uint8)
    y = gen.integers(0, 2, size=200)
    x[y == 1, :, :, 0] += 120  # a bright red channel marks class 1
    y = np.where(gen.random(200) < 0.1, 1 - y, y)  # one label in ten wrong: a trained model errs on its training data
    root = tmp_path / "proj"
    root.mkdir()
    (root / "colour_cnn.py").write_text(CNN)
    for name, rows in (("train", slice(0, 150)), ("test", slice(150, 200))):
        datasets.Dataset.from_dict({"image": x[rows].tolist(), "label": y[rows].tolist()}).save_to_disk(str(root / name))
    import sys

    sys.path.insert(0, str(root))
    try:
        from colour_cnn import build
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    model = build()
    xs = torch.from_numpy(x[:150].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    ys = torch.from_numpy(y[:150])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    assert (model(xs).argmax(1) == ys).float().mean() > 0.8
    torch.save(model.state_dict(), root / "cnn.pt")
    (root / "cfg.yaml").write_text("model: {factory: colour_cnn:build, checkpoints: [cnn.pt]}\n"
                                   "data: {train_path: train, query_path: test, train_size: null, query_size: 20}\n"
                                   "featurize: {k: 32}\nscore: {topk: 3, show: 0}\n")
    return root


@pytest.fixture(scope="module")
def colour_project(tmp_path_factory) -> Path:
    return _colour_project(tmp_path_factory.mktemp("colour"))


def test_colour_images_stored_hwc_reach_a_cnn_as_nchw(colour_project: Path, tmp_path: Path) -> None:
    assert main(["run", str(colour_project / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    import json

    entry = json.loads((tmp_path / "run" / "checkpoints" / "checkpoints.json").read_text())["checkpoints"][0]
    assert entry["sample_accuracy"] > 0.8  # the checkpoint is measured through the configured collate


@pytest.mark.parametrize("setting, key", [("data.image_scale=none", "data.image_scale"),
                                          ("data.image_layout=stored", "data.image_layout")])
def test_mis_scaled_or_wrongly_laid_out_inputs_are_refused(colour_project: Path, tmp_path: Path, capsys, setting: str,
                                                          key: str) -> None:
    code = main(["run", str(colour_project / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err
    assert not (tmp_path / "run" / "features-train").exists()  # refused before featurizing
    # the refusal can be overridden for checkpoints that are meant to be untrained (the layout error cannot:
    # the model cannot run on the batch at all)
    if setting.startswith("data.image_scale"):
        assert main(["run", str(colour_project / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet", "--set",
                     setting, "--set", "model.check_trained=false"]) == 0
