"""The one decoder of a shard sample's members, used by every reader of shards (the torch
loader, the DALI loader's Python side, the mask pass, tools/).

    sample = decode_sample(reader.read(i))     # {"rgb", "labels", "mask", "meta"} as present

``image``/``png`` -> rgb (H, W, 3) uint8; ``labels`` -> multi-hot float32 (C,); ``mask.png`` -> class
indices (H, W) uint8 (8-bit greyscale or palette PNG only); ``json`` -> dict. ``size``
resizes rgb (bilinear) and mask (nearest) to size x size.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from mlps_dist.core.png import SIGNATURE
from mlps_dist.data.shards import decode_labels

try:  # libpng/libspng through imagecodecs: ~1.6x PIL's PNG decoding, same pixels
    import imagecodecs
except ImportError:  # the torch-free deployment install has Pillow only
    imagecodecs = None

__all__ = ["decode_rgb", "resize_rgb", "decode_indices", "decode_labels", "decode_meta", "decode_sample"]


_PNG_GREY, _PNG_RGB = 0, 2  # IHDR colour types (palette 3 is expanded to RGB by libpng: PIL keeps indices)


def _fast_png(encoded: bytes, colour_type: int) -> np.ndarray | None:
    """An 8-bit PNG of ``colour_type`` (grey -> (H, W), RGB -> (H, W, 3) uint8) without PIL;
    None for anything else, which PIL then decodes (or rejects with its own, clearer error)."""
    # IHDR follows the 8-byte signature: length (4), "IHDR" (4), width, height (4 each),
    # bit depth at byte 24, colour type at byte 25.
    if imagecodecs is None or len(encoded) < 26 or not encoded.startswith(SIGNATURE):
        return None
    if encoded[24] != 8 or encoded[25] != colour_type:
        return None
    try:
        out = imagecodecs.png_decode(encoded)
    except Exception:  # noqa: BLE001 - PIL decodes it or raises its own, clearer error
        return None
    expected = 2 if colour_type == _PNG_GREY else 3
    return out if out.dtype == np.uint8 and out.ndim == expected else None


def decode_rgb(encoded: bytes, size: int = 0) -> np.ndarray:
    """PNG, WebP or JPEG bytes -> (H, W, 3) uint8. 8-bit RGB PNG (what shards hold) takes the
    fast decoder; grey, palette, alpha, 16-bit, WebP and JPEG go through PIL's conversion."""
    rgb = _fast_png(encoded, _PNG_RGB)
    if rgb is None:
        rgb = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), dtype=np.uint8)
    return resize_rgb(rgb, size)


def resize_rgb(rgb: np.ndarray, size: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 resized (bilinear) to size x size; unchanged when size is 0 or equal."""
    if size and rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return rgb


def decode_indices(png: bytes, size: int = 0) -> np.ndarray:
    """8-bit greyscale (pseudo masks) or palette (LUAD/BCSS ground truth) PNG -> (H, W) uint8
    class indices; greyscale takes the fast decoder."""
    indices = _fast_png(png, _PNG_GREY)
    if indices is not None:
        if not size or indices.shape == (size, size):
            return indices
        img = Image.fromarray(indices)
    else:
        img = Image.open(io.BytesIO(png))
        if img.mode not in ("L", "P"):
            raise ValueError(f"mask PNG has mode {img.mode}; expected 8-bit class indices")
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def decode_meta(raw: bytes) -> dict:
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("the json member is not an object")
    return meta


def decode_sample(members: dict[str, bytes], size: int = 0) -> dict:
    """Every member present in ``members`` (as read by SplitReader.read), decoded."""
    out = {}
    encoded = members.get("image", members.get("png"))  # "image": the split's encoding (PNG, WebP, JPEG)
    if encoded is not None:
        out["rgb"] = decode_rgb(encoded, size)
    if "labels" in members:
        out["labels"] = decode_labels(members["labels"])
    if "mask.png" in members:
        out["mask"] = decode_indices(members["mask.png"], size)
    if "json" in members:
        out["meta"] = decode_meta(members["json"])
    return out
