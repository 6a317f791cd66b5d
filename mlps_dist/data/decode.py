"""The one decoder of a shard sample's members, used by every reader of shards (the torch
loader, the DALI loader's Python side, the mask pass, tools/).

    sample = decode_sample(reader.read(i))     # {"rgb", "labels", "mask", "meta"} as present

``png`` -> rgb (H, W, 3) uint8; ``labels`` -> multi-hot float32 (C,); ``mask.png`` -> class
indices (H, W) uint8 (8-bit greyscale or palette PNG only); ``json`` -> dict. ``size``
resizes rgb (bilinear) and mask (nearest) to size x size.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from mlps_dist.data.shards import decode_labels

__all__ = ["decode_rgb", "decode_indices", "decode_labels", "decode_meta", "decode_sample"]


def decode_rgb(png: bytes, size: int = 0) -> np.ndarray:
    """PNG, WebP or JPEG bytes (PIL tells them apart) -> (H, W, 3) uint8."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if size and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_indices(png: bytes, size: int = 0) -> np.ndarray:
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
