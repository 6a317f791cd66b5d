"""TIFF images read as RGB row bands (tifffile's strip/tile decoder), for imagerows.open_rows.

    if tiff_streamable(path):
        source = TiffRows(path)          # a BufferedRows: rows(top, bottom), release(top)

Streamed: the first page of a TIFF with 8-bit unsigned samples stored contiguously (not
planar), grey, grey + alpha, RGB or RGBA (unassociated alpha), in strips or tiles, any
compression tifffile decodes (none, LZW, deflate, JPEG, ...). Strips are bands as stored; tiles
are gathered one row of tiles at a time, so memory is one tile row of the image's width.
Each band goes through imagerows.rgb_from_pil, the rule the whole-image path applies, so both
give the same pixels. Anything else (16-bit, planar, palette, CMYK, several depth planes) is
left to Pillow, decoded whole. tifffile is imported lazily: without it (the torch-free
deploy install) no TIFF is streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core.imagerows import BufferedRows, Transform, rgb_from_pil

# samples per pixel -> Pillow mode of one band (2 and 4 only with unassociated alpha)
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_MINISBLACK, _RGB, _YCBCR = 1, 2, 6
_UNASSOCIATED_ALPHA = 2


def _streamable_page(page) -> bool:
    samples = page.samplesperpixel
    alpha_ok = samples in (1, 3) or tuple(page.extrasamples) == (_UNASSOCIATED_ALPHA,)
    colour_ok = (page.photometric == _MINISBLACK and samples in (1, 2)) or (
        page.photometric in (_RGB, _YCBCR) and samples in (3, 4)
    )
    return (
        page.bitspersample == 8
        and page.sampleformat == 1
        and page.imagedepth == 1
        and (samples == 1 or page.planarconfig == 1)
        and alpha_ok
        and colour_ok
    )


def tiff_streamable(path: str | Path) -> bool:
    """True when TiffRows reads this file (see the module docstring); False for other files,
    other TIFFs, or without tifffile."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return _streamable_page(tif.pages[0])
    except Exception:  # not a TIFF tifffile can parse: Pillow decodes it, or names the problem
        return False


class TiffRows(BufferedRows):
    """The first page of a streamable TIFF as RGB row bands (``transform`` per band)."""

    def __init__(self, path: str | Path, transform: Transform | None = None):
        import tifffile

        self.path = Path(path)
        self._tif = tifffile.TiffFile(self.path)
        self._page = self._tif.pages[0]
        height, width = self._page.imagelength, self._page.imagewidth
        super().__init__(width, height, self._bands(), transform)

    def _rgb(self, samples: np.ndarray) -> np.ndarray:
        mode = _MODES[samples.shape[-1]]
        plane = samples[..., 0] if mode == "L" else samples
        return rgb_from_pil(Image.fromarray(np.ascontiguousarray(plane), mode))

    def _bands(self) -> Iterator[np.ndarray]:
        page, width, height = self._page, self.width, self.height
        samples = page.samplesperpixel
        try:
            if not page.is_tiled:
                for segment, (_, _, top, _, _), shape in page.segments(maxworkers=1):
                    rows = min(shape[1], height - top)
                    band = np.zeros((rows, width, samples), np.uint8) if segment is None else segment[0, :rows, :width]
                    yield self._rgb(band)
                return
            tile_h, tile_w = page.tilelength, page.tilewidth
            across = -(-width // tile_w)
            band, filled = None, 0
            for segment, (_, _, top, left, _), _ in page.segments(maxworkers=1):  # row-major order
                if band is None:
                    band = np.zeros((min(tile_h, height - top), width, samples), np.uint8)  # empty tiles stay 0
                if segment is not None:
                    cols = min(tile_w, width - left)
                    band[:, left : left + cols] = segment[0, : len(band), :cols]
                filled += 1
                if filled == across:
                    yield self._rgb(band)
                    band, filled = None, 0
        except Exception as exc:
            raise ValueError(f"{self.path}: cannot be decoded ({exc}); re-export it") from exc

    def close(self) -> None:
        self._tif.close()
