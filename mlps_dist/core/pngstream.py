"""PNG files written row band by row band, so an image never has to be held whole.

    with open(path, "wb") as f:
        png = PngRowWriter(f, width, height, palette=colours)   # 8-bit palette; None: RGB
        for band in bands:                                     # (rows, W) or (rows, W, 3) uint8
            png.write(band)
        png.close()                                            # IEND; refuses a short image

The bytes are Pillow's for the same pixels (``Image.save(format="PNG")`` with its default
settings): zlib level 6 with memLevel 9 (Z_FILTERED for RGB), IDAT chunks of Pillow's buffer size, palette rows
unfiltered, RGB rows with the filter Pillow picks per row (none, up, sub or Paeth, whichever
gives the smallest sum of byte distances from 0, the first on ties). So an image written by
bands is the same file as the one written whole (tests/test_infer_stream.py compares them;
the deflate stream needs the same zlib as Pillow's, which the test checks too). Numpy and
zlib only: usable without torch.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np

from mlps_dist.core.png import SIGNATURE

PIL_MAXBLOCK = 65536  # PIL.ImageFile.MAXBLOCK: the encoder's output buffer
FILTER_CHUNK_BYTES = 1 << 18  # raw bytes filtered at once (bounds the int16 and int64 temporaries)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _distance(filtered: np.ndarray) -> np.ndarray:
    """Per row: the sum over bytes of min(v, 256 - v), Pillow's (and libpng's) filter cost."""
    v = filtered.astype(np.int64)
    return np.where(v < 128, v, 256 - v).sum(axis=1)


def filter_rows(rows: np.ndarray, previous: np.ndarray, bpp: int) -> np.ndarray:
    """(n, B) uint8 raw rows -> (n, 1 + B) filtered rows with their filter byte, as Pillow's
    ZIP encoder chooses them; ``previous`` is the raw row above the first one (zeros at the top)."""
    above = np.concatenate([previous[None], rows[:-1]]).astype(np.int16)
    x = rows.astype(np.int16)
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    upper_left = np.zeros_like(x)
    upper_left[:, bpp:] = above[:, :-bpp]
    pa, pb, pc = np.abs(above - upper_left), np.abs(left - upper_left), np.abs(left + above - 2 * upper_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
    # Pillow's order: none (0), up (2), sub (1), Paeth (4); a later filter wins only when strictly better.
    candidates = [(0, x), (2, x - above), (1, x - left), (4, x - paeth)]
    filtered = [(code, (values & 0xFF).astype(np.uint8)) for code, values in candidates]
    best = np.argmin(np.stack([_distance(values) for _, values in filtered]), axis=0)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    for choice, (code, values) in enumerate(filtered):
        pick = best == choice
        out[pick, 0] = code
        out[pick, 1:] = values[pick]
    return out


class PngRowWriter:
    """An 8-bit palette (``palette`` given: C colours) or RGB PNG written from row bands."""

    def __init__(self, f: BinaryIO, width: int, height: int, palette=None):
        self.f, self.width, self.height = f, int(width), int(height)
        self.channels = 1 if palette is not None else 3
        self.rows_written = 0
        self._previous = np.zeros(self.width * self.channels, np.uint8)
        # Pillow deflates filtered (RGB) rows with Z_FILTERED, palette rows with the default strategy.
        strategy = zlib.Z_DEFAULT_STRATEGY if palette is not None else zlib.Z_FILTERED
        self._zlib = zlib.compressobj(6, zlib.DEFLATED, 15, 9, strategy)
        self._pending = bytearray()
        self._block = max(PIL_MAXBLOCK, self.width * 4)  # PIL.ImageFile._save's buffer size
        colour_type = 3 if palette is not None else 2
        f.write(SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, colour_type, 0, 0, 0)))
        if palette is not None:
            flat = bytes(int(v) for colour in palette for v in colour)
            f.write(
                _chunk(b"PLTE", flat + b"\0" * (768 - len(flat)))
            )  # all 256 entries, as png.encode_indices(full_palette=True)

    def write(self, band: np.ndarray) -> None:
        band = np.ascontiguousarray(band, np.uint8)
        rows = band.reshape(band.shape[0], -1)
        if rows.shape[1] != self.width * self.channels:
            raise ValueError(
                f"a band of {band.shape} does not fit a {self.width} px wide PNG of {self.channels} channel(s)"
            )
        if self.rows_written + rows.shape[0] > self.height:
            raise ValueError(f"more than {self.height} rows written to a {self.height} px high PNG")
        step = max(1, FILTER_CHUNK_BYTES // max(rows.shape[1], 1))
        for top in range(0, rows.shape[0], step):
            part = rows[top : top + step]
            if self.channels == 1:  # palette rows: never filtered (Pillow's ZIP_PNG_PALETTE)
                filtered = np.concatenate([np.zeros((part.shape[0], 1), np.uint8), part], axis=1)
            else:
                filtered = filter_rows(part, self._previous, self.channels)
            self._previous = part[-1].copy()
            self._pending += self._zlib.compress(filtered.tobytes())
            self._emit(final=False)
        self.rows_written += rows.shape[0]

    def _emit(self, final: bool) -> None:
        while len(self._pending) >= self._block or (final and self._pending):
            size = min(self._block, len(self._pending))
            self.f.write(_chunk(b"IDAT", bytes(self._pending[:size])))
            del self._pending[:size]

    def close(self) -> None:
        if self.rows_written != self.height:
            raise ValueError(f"{self.rows_written} of {self.height} rows written")
        self._pending += self._zlib.flush()
        self._emit(final=True)
        self.f.write(_chunk(b"IEND", b""))
