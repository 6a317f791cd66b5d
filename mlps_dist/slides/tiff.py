"""Pyramidal tiled TIFF writing (tifffile) in the form OpenSlide opens as ``generic-tiff``.

Level 0 first, then 2x reduced levels (``subfiletype=1``) down to about two tiles a side,
all in 256 px tiles, the resolution in pixels per centimetre so that OpenSlide reports
``openslide.mpp-x``/``mpp-y``. Used for the synthetic slides and the class maps of
segment_slides (``compression="zlib"`` keeps class colours exact).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.fileio import commit_file, tmp_path


def write_pyramid_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None, tile: int = 256,
                       compression: str = "jpeg", nearest: bool = False) -> None:
    """A tiled pyramidal TIFF that OpenSlide opens as generic-tiff (atomically written).
    ``nearest``: reduced levels by picking pixels (class colours stay palette colours)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    levels = [rgb]
    while min(levels[-1].shape[:2]) > 1 and max(levels[-1].shape[:2]) > 2 * tile:
        top = levels[-1]
        levels.append(np.ascontiguousarray(top[::2, ::2]) if nearest else np.asarray(Image.fromarray(top).reduce(2)))
    res = {}
    try:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for number, level in enumerate(levels):
                if mpp:
                    scale = mpp * (rgb.shape[1] / level.shape[1])
                    res = {"resolution": (1e4 / scale, 1e4 / scale), "resolutionunit": "CENTIMETER"}
                tif.write(level, tile=(tile, tile), photometric="rgb", compression=compression,
                          subfiletype=1 if number else 0, metadata=None, **res)
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
