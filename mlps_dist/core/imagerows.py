"""Images read as RGB row bands, so that infer never has to hold a large image whole.

    source = open_rows(path)                 # PngRows (streamed) or ArrayRows (decoded whole)
    band = source.rows(top, bottom)          # (bottom - top, W, 3) uint8, top never decreasing
    source.release(top)                      # rows above ``top`` may be dropped

What is streamed: non-interlaced PNGs of 8-bit grey, grey+alpha, RGB, RGBA or palette
pixels and 16-bit grey (PngRows: memory for the rows asked for, not the image; Pillow's own
decoder, band by band), and 8-bit grey/RGB(A) TIFFs in strips or tiles (tiffrows.TiffRows:
one strip or row of tiles at a time). Every other file (JPEG, BMP, WebP, interlaced or other
PNGs, other TIFFs) is decoded whole by Pillow, and its RGB (3 bytes per pixel) is held while
its rows are read.

Colour conversion is ``rgb_from_pil`` for both, applied to each band of a streamed PNG as to a
whole image (each rule works pixel by pixel), so both give the same bytes: RGBA, LA and
transparent palettes composited onto white (empty glass is white in H&E), greyscale and
palettes expanded, 16-bit scaled by 65535 (tiles of one scan keep one scale).

``transform`` (a stain normalisation fixed for the image) is applied once to each band read;
``rows(..., raw=True)`` returns the rows as read, for the overlay. Numpy and Pillow only:
usable without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core.png import SIGNATURE
from mlps_dist.core.pngstream import _chunk

Transform = Callable[[np.ndarray], np.ndarray]


def rgb_from_pil(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 (a writable copy) of an open Pillow image; see the module docstring."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    elif img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)  # by the bit depth, not the image's own maximum:
        full = 65535.0 if arr.max() <= 65535 else arr.max()  # tiles of one slide keep one scale
        img = Image.fromarray(np.clip(arr / full * 255, 0, 255).round().astype(np.uint8))
    return np.array(img.convert("RGB"))


class BufferedRows:
    """Rows from a forward-only iterator of bands, kept from the last ``release`` on."""

    def __init__(self, width: int, height: int, bands: Iterator[np.ndarray], transform: Transform | None = None):
        self.width, self.height = int(width), int(height)
        self._bands, self._transform = bands, transform
        self._top = 0  # first row held
        self._raw = np.empty((0, self.width, 3), np.uint8)
        self._model = self._raw

    def _fill(self, bottom: int) -> None:
        parts, model_parts, held = [self._raw], [self._model], self._top + len(self._raw)
        while held < bottom:
            band = next(self._bands, None)
            if band is None:
                raise ValueError(f"the image ended after {held} of {self.height} rows (truncated?)")
            parts.append(band)
            model_parts.append(self._transform(band) if self._transform else band)
            held += len(band)
        if len(parts) > 1:
            self._raw = np.concatenate(parts)
            self._model = np.concatenate(model_parts) if self._transform else self._raw

    def rows(self, top: int, bottom: int, raw: bool = False) -> np.ndarray:
        if top < self._top:
            raise ValueError(f"row {top} was already released (rows are read top to bottom)")
        self._fill(min(bottom, self.height))
        held = self._raw if raw else self._model
        return held[top - self._top : bottom - self._top]

    def close(self) -> None:
        """Nothing to close for rows from memory; the file-backed readers close their file."""

    def release(self, below: int) -> None:
        drop = max(0, below - self._top)
        if drop:
            self._raw = self._raw[drop:].copy()
            self._model = self._model[drop:].copy() if self._transform else self._raw
            self._top += drop


class ArrayRows(BufferedRows):
    """An image already in memory (H, W, 3) uint8, read as bands (``transform`` per band)."""

    def __init__(self, rgb: np.ndarray, transform: Transform | None = None, band: int = 256):
        h, w = rgb.shape[:2]
        super().__init__(w, h, (rgb[top : top + band] for top in range(0, h, band)), transform)


# (bit depth, colour type) -> bytes per pixel of the PNGs read by rows; for these Pillow's
# decoded pixels are the PNG's own samples (16-bit grey as I;16), so a band's last row is the
# unfiltered row the next band's filters refer to.
_STREAMED = {(8, 0): 1, (8, 2): 3, (8, 3): 1, (8, 4): 2, (8, 6): 4, (16, 0): 2}
BAND_ROWS = 64


def _chunks(f) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk after the signature, CRCs checked."""
    import struct
    import zlib

    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("the file ends before its IEND chunk (truncated)")
        length, kind = struct.unpack(">I", head[:4])[0], head[4:]
        data, crc = f.read(length), f.read(4)
        if len(data) < length or len(crc) < 4:
            raise ValueError(f"the file ends inside its {kind.decode(errors='replace')} chunk (truncated)")
        if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"broken PNG file: CRC error in a {kind.decode(errors='replace')} chunk")
        yield kind, data
        if kind == b"IEND":
            return


def _png_header(path: Path) -> dict | None:
    """width, height, bit depth, colour type, bytes per pixel of a PNG read by rows; None otherwise."""
    import struct

    try:
        with open(path, "rb") as f:
            if f.read(8) != SIGNATURE:
                return None
            kind, data = next(_chunks(f))
    except (OSError, ValueError, StopIteration):
        return None
    if kind != b"IHDR" or len(data) != 13:
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data)
    if interlace or (depth, colour) not in _STREAMED or not width or not height:
        return None
    return {"width": width, "height": height, "depth": depth, "colour": colour, "bpp": _STREAMED[depth, colour]}


def png_streamable(path: str | Path) -> bool:
    """True for the PNGs PngRows reads by rows (see the module docstring)."""
    return _png_header(Path(path)) is not None


class PngRows(BufferedRows):
    """A PNG read by row bands: its zlib stream is inflated as it is read, and each band of
    filtered rows, preceded by the band above's last row (unfiltered: filter type 0, so the
    band's filters see the right row above), becomes a small PNG of its own with the file's
    PLTE and tRNS chunks, which Pillow decodes; ``rgb_from_pil`` converts it as the whole
    image would be. Memory: a band, not the image; speed: Pillow's decoder."""

    def __init__(self, path: str | Path, transform: Transform | None = None, band: int = BAND_ROWS):
        self.path = Path(path)
        header = _png_header(self.path)
        if header is None:
            raise ValueError(f"{path}: not a PNG that can be read by rows")
        self._header, self._band = header, band
        self._file = open(self.path, "rb")
        super().__init__(header["width"], header["height"], self._bands(), transform)

    def _band_png(self, rows: bytes, count: int, kept: list[tuple[bytes, bytes]]) -> bytes:
        import struct
        import zlib

        h = self._header
        ihdr = struct.pack(">IIBBBBB", h["width"], count, h["depth"], h["colour"], 0, 0, 0)
        return (
            SIGNATURE
            + _chunk(b"IHDR", ihdr)
            + b"".join(_chunk(k, d) for k, d in kept)
            + _chunk(b"IDAT", zlib.compress(rows, 1))
            + _chunk(b"IEND", b"")
        )

    def _bands(self) -> Iterator[np.ndarray]:
        import io
        import zlib

        h = self._header
        stride = 1 + h["width"] * h["bpp"]
        inflate = zlib.decompressobj()
        kept: list[tuple[bytes, bytes]] = []  # PLTE, tRNS: what Pillow's colour conversion reads
        pending, state = bytearray(), {"above": None, "done": 0}

        def decode_bands() -> Iterator[np.ndarray]:
            while state["done"] < h["height"]:
                count = min(self._band, h["height"] - state["done"])
                if len(pending) < stride * count:
                    return
                rows = bytes(pending[: stride * count])
                del pending[: stride * count]
                above = state["above"]
                lead = b"" if above is None else b"\0" + above
                with Image.open(io.BytesIO(self._band_png(lead + rows, count + bool(lead), kept))) as img:
                    img.load()
                    samples = np.asarray(img)
                    rgb = rgb_from_pil(img)
                last = samples[-1].astype(">u2") if h["depth"] == 16 else samples[-1]
                state["above"] = np.ascontiguousarray(last).tobytes()
                state["done"] += count
                yield rgb[1:] if lead else rgb

        self._file.seek(len(SIGNATURE))
        try:
            for kind, data in _chunks(self._file):
                if kind in (b"PLTE", b"tRNS"):
                    kept.append((kind, data))
                elif kind == b"IDAT":
                    while data:  # inflated a band at a time: a small chunk may inflate to gigabytes
                        pending += inflate.decompress(data, stride * self._band)
                        data = inflate.unconsumed_tail
                        yield from decode_bands()
                elif kind == b"IEND":
                    pending += inflate.flush()
                    yield from decode_bands()
                    return
        except (OSError, ValueError, zlib.error) as exc:  # corrupt or truncated, found mid-image
            raise ValueError(
                f"{self.path}: cannot be read as an image ({exc}); remove it from --input or re-export it"
            ) from exc

    def close(self) -> None:
        self._file.close()


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header."""
    with Image.open(path) as img:
        return img.size


def open_rows(path: str | Path, transform: Transform | None = None, decode: Callable | None = None) -> BufferedRows:
    """PngRows or TiffRows where the file allows it, else ArrayRows of the whole decoded image
    (``decode``: path -> (H, W, 3) uint8, default Pillow + rgb_from_pil)."""
    path = Path(path)
    if path.suffix.lower() == ".png" and png_streamable(path):
        return PngRows(path, transform)
    from mlps_dist.core.tiffrows import TiffRows, tiff_streamable  # imports this module

    if tiff_streamable(path):
        return TiffRows(path, transform)
    if decode is None:

        def decode(p):
            with Image.open(p) as img:
                img.load()
                return rgb_from_pil(img)

    return ArrayRows(decode(path), transform)
