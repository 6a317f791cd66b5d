"""The PNG codec (mlps_dist/core/png.py): what each form stores, and that it decodes back."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from mlps_dist.core import png

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 255, 255)]


def header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    assert data.startswith(png.SIGNATURE) and data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def chunk(data: bytes, kind: bytes) -> bytes:
    at = data.index(kind)
    (length,) = struct.unpack(">I", data[at - 4 : at])
    return data[at + 4 : at + 4 + length]


def test_rgb_grey_and_indices_round_trip_with_the_stored_form():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (17, 23, 3)).astype(np.uint8)
    grey = rng.integers(0, 256, (9, 5)).astype(np.uint8)
    indices = rng.integers(0, len(PALETTE), (12, 31)).astype(np.uint8)
    assert header(png.encode(rgb)) == (23, 17, 8, 2)
    assert header(png.encode(grey)) == (5, 9, 8, 0)
    assert header(png.encode_indices(indices)) == (31, 12, 8, 0)
    assert np.array_equal(png.decode(png.encode(rgb)), rgb)
    assert np.array_equal(png.decode(png.encode(grey)), grey)
    assert np.array_equal(png.decode(png.encode_indices(indices)), indices)
    # Palettised: the pixel values stay the indices, the colours are the palette's.
    for full in (False, True):
        data = png.encode_indices(indices, PALETTE, full_palette=full)
        assert np.array_equal(png.decode(data), indices)
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == "P" and image.getpalette()[:12] == [v for c in PALETTE for v in c]
    # Four colours fit 2 bits per pixel; the full palette is always 256 entries of 8 bits.
    assert header(png.encode_indices(indices, PALETTE))[2:] == (2, 3)
    full = png.encode_indices(indices, PALETTE, full_palette=True)
    assert header(full)[2:] == (8, 3) and len(chunk(full, b"PLTE")) == 768


def test_a_pil_image_is_saved_as_it_is_and_a_file_decodes(tmp_path):
    image = Image.fromarray(np.full((4, 6, 3), 90, np.uint8))
    image.info["icc_profile"] = b"not-a-real-profile"  # Pillow writes what the image carries
    data = png.encode(image)
    assert b"iCCP" in data and b"iCCP" not in png.encode(np.asarray(image))
    (tmp_path / "x.png").write_bytes(data)
    decoded = png.decode(tmp_path / "x.png")
    assert decoded.shape == (4, 6, 3) and (decoded == 90).all() and decoded.flags.writeable
