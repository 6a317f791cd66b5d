"""The PNG codec of the package: Pillow's encoder with its default settings, and its decoder.

    encode(pixels)                    (H, W, 3) RGB or (H, W) grey uint8, or a PIL image as it is
    encode_indices(indices)           (H, W) class indices as 8-bit grey (pseudo masks, shard masks)
    encode_indices(indices, palette)  the same, palettised: viewers show the class colours
    decode(data_or_path)              -> (H, W, 3) RGB, (H, W[, 4]) or (H, W) grey/palette indices, as stored

Files written here are compared by their bytes (stamps and work keys hash them, a rerun must
find its outputs unchanged, core/pngstream.py writes the same bytes by row bands), so the
encoder settings never change. Numpy and Pillow only: usable without torch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _save(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode(pixels) -> bytes:
    """An RGB or grey uint8 array, or a PIL image saved as it is (an image read from a file
    keeps what Pillow carries over from it, such as its ICC profile)."""
    from PIL import Image

    if isinstance(pixels, Image.Image):
        return _save(pixels)
    return _save(Image.fromarray(np.asarray(pixels, np.uint8)))


def encode_indices(indices: np.ndarray, palette=None, full_palette: bool = False) -> bytes:
    """(H, W) class indices: 8-bit grey without ``palette``; with ``palette`` (colours as
    (r, g, b) triples) a palettised PNG whose pixel values stay the indices. ``full_palette``
    pads the palette to 256 entries, so the file is always 8 bits per pixel (the form
    core/pngstream.py streams); without it Pillow stores only the given colours and packs
    the pixels into 1, 2 or 4 bits where they fit."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(indices, dtype=np.uint8), mode="L")
    if palette is None:
        return _save(image)
    image = image.convert("P")
    flat = [int(v) for colour in palette for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)) if full_palette else flat)
    return _save(image)


def decode(source: bytes | str | Path) -> np.ndarray:
    """PNG bytes or a PNG file -> its pixels as stored (palette images give their indices);
    a writable array."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source) as image:
        return np.array(image)
