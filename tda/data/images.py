"""Image columns in every storage form, turned into model inputs and into pictures, explicitly.

A ``datasets`` image column reaches a collate as one of: a list (or nested lists) of numbers,
numpy arrays (one per row, or one stacked array), an object array of arrays, PIL images (the
``Image`` feature in Python format) or ``{"bytes", "path"}`` dicts (the same feature in Arrow
format). :func:`stack_images` turns any of them into one numeric array ``(B, *shape)`` without
changing a value; :func:`image_batch` then applies exactly the two transforms a config states:

- **layout**: ``"auto"`` (a 3-D image whose last axis has 1, 3 or 4 entries and whose first has
  not is HWC, the reverse CHW; anything else ambiguous is an error naming the key), ``"HWC"``,
  ``"CHW"`` (both give channel-first ``(B, C, H, W)``, PyTorch's convention) or ``"stored"``
  (the stored shape, untouched). 2-D images ``(H, W)`` stay as stored under ``auto``; ``HWC`` or
  ``CHW`` gives them a channel axis, ``(B, 1, H, W)``, for a CNN. Flat vectors stay as stored.
- **scale**: a number the values are divided by (``255``: uint8 pixels to [0, 1]), ``"auto"``
  (255 for integer dtypes, 1 for floats: ``data.image_scale: auto``, docs/configs.md), or ``1``/``"none"``.

:func:`display_image` is the same reading for a picture: one stored image as ``(H, W)`` or
``(H, W, C)`` uint8, whatever its layout, so a report never shows a CHW buffer as HWC stripes.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from tda.errors import DataError

LAYOUTS = ("auto", "HWC", "CHW", "stored")
CHANNELS = (1, 3, 4)


def _one(value: Any) -> np.ndarray:
    """One stored image as a numeric array (PIL image, bytes dict, array, tensor or nested lists)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        from PIL import Image

        data = value.get("bytes")
        value = Image.open(io.BytesIO(data) if data is not None else value["path"])
    if hasattr(value, "getbands") and hasattr(value, "size"):  # a PIL image: (H, W) or (H, W, C)
        return np.asarray(value)
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = _numeric(arr)
    if arr.dtype == object:
        try:
            arr = np.stack([_one(v) for v in value])
        except ValueError as exc:
            raise DataError(f"an image has rows of different lengths ({exc}); store each image as a full grid") from exc
    return arr


def _numeric(arr: np.ndarray) -> np.ndarray:
    """An object array of nested numbers (Arrow list columns arrive so) as a numeric array, at
    C speed; unchanged when its elements are not all numbers of one regular shape."""
    try:
        out = np.asarray(arr.tolist())
    except (ValueError, TypeError):
        return arr
    return out if out.dtype.kind in "iufb" else arr


def stack_images(values: Any, column: str = "image") -> np.ndarray:
    """A batch of stored images as one numeric array ``(B, *shape)``, values unchanged."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        values = _numeric(values)
    if isinstance(values, np.ndarray) and values.dtype != object:
        arr = values
    else:
        items = [_one(v) for v in values]
        shapes = {a.shape for a in items}
        if len(shapes) > 1:
            raise DataError(f"column {column!r} holds images of different shapes {sorted(shapes)[:3]}; resize them to "
                            "one shape first (or set data.collate to your own function)")
        arr = np.stack(items) if items else np.zeros((0,), np.float32)
    if arr.dtype.kind not in "iufb":
        raise DataError(f"column {column!r} holds {arr.dtype} values, not numbers; store pixels as numbers or images")
    return arr


def infer_layout(shape: Sequence[int], column: str = "image") -> str:
    """``"HWC"``, ``"CHW"`` or ``"flat"`` for one image's ``shape`` (see the module docstring)."""
    if len(shape) != 3:
        return "flat"
    first, last = shape[0] in CHANNELS, shape[-1] in CHANNELS
    if last and not first:
        return "HWC"
    if first and not last:
        return "CHW"
    raise DataError(f"cannot tell whether the images of column {column!r}, of shape {tuple(shape)}, are stored "
                    "channels-last or channels-first; set data.image_layout to 'HWC' or 'CHW'")


def to_channels_first(arr: np.ndarray, layout: str, column: str = "image") -> np.ndarray:
    """``(B, *shape)`` in ``layout`` (:data:`LAYOUTS`) -> ``(B, C, H, W)`` for 3-D images."""
    if layout not in LAYOUTS:
        raise DataError(f"data.image_layout is {layout!r}; choose one of {LAYOUTS}")
    if layout in ("HWC", "CHW") and arr.ndim == 3:  # (B, H, W) grey images for a model that wants channels
        return np.ascontiguousarray(arr[:, None])
    if layout == "stored" or arr.ndim != 4:
        if layout in ("HWC", "CHW") and arr.ndim != 4:
            raise DataError(f"data.image_layout is {layout!r} but the images of column {column!r} have shape "
                            f"{tuple(arr.shape[1:])} (neither 2-D nor 3-D); set data.image_layout to 'auto' or 'stored'")
        return arr
    stored = infer_layout(arr.shape[1:], column) if layout == "auto" else layout
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2)) if stored == "HWC" else arr


def pixel_scale(dtype: np.dtype, scale: float | str) -> float:
    """The divisor of ``scale`` (a number, ``"auto"``: 255 for integer dtypes else 1, ``"none"``: 1)."""
    if scale == "auto":
        return 255.0 if np.dtype(dtype).kind in "iu" else 1.0
    if scale == "none":
        return 1.0
    value = float(scale)
    if not value > 0:
        raise DataError(f"data.image_scale must be > 0, 'auto' or 'none', got {scale!r}")
    return value


def image_batch(values: Any, layout: str = "auto", scale: float | str = "auto", column: str = "image") -> np.ndarray:
    """Stored images -> float32 model inputs: ``layout`` then division by ``scale`` (module docstring)."""
    arr = stack_images(values, column)
    divisor = pixel_scale(arr.dtype, scale)
    return to_channels_first(arr, layout, column).astype(np.float32) / np.float32(divisor)


def display_image(value: Any, layout: str = "auto", shape: Sequence[int] | None = None) -> np.ndarray | None:
    """One stored image as uint8 ``(H, W)`` or ``(H, W, C)`` for a picture (None: not an image).

    ``shape``: the ``(C, H, W)`` of a flat, channel-major vector (the demo sets store CIFAR-2 so).
    Floats in [0, 1] are scaled by 255; other ranges are stretched to [0, 255].
    """
    arr = _one(value)
    if arr.ndim == 1 and shape is not None and int(np.prod(shape)) == arr.size:
        arr, layout = arr.reshape(shape), "CHW"
    if arr.ndim == 3:
        stored = infer_layout(arr.shape, "image") if layout in ("auto", "stored") else layout
        arr = arr.transpose(1, 2, 0) if stored == "CHW" else arr
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    if arr.ndim not in (2, 3):
        return None
    if arr.dtype == np.uint8:
        return arr
    x = arr.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        x = x * 255
    elif not (lo >= 0 and hi <= 255):
        x = (x - lo) / max(hi - lo, 1e-12) * 255
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


__all__ = ["LAYOUTS", "display_image", "image_batch", "infer_layout", "pixel_scale", "stack_images",
           "to_channels_first"]
