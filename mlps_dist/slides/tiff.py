"""Pyramidal tiled TIFF writing (tifffile) in the form OpenSlide opens as ``generic-tiff``.

Level 0 first, then 2x reduced levels (``subfiletype=1``) down to about two tiles a side,
all in 256 px tiles, the resolution in pixels per centimetre so that OpenSlide reports
``openslide.mpp-x``/``mpp-y``.

- ``write_pyramid_tiff``: RGB (the synthetic slides).
- ``write_index_tiff``: a class-index map (segment_slides' classes.tiff): 8-bit pixels that
  are the class indices, ``photometric=palette`` with the class colours as its colormap, so
  viewers show colours and programs read indices. Reduced levels pick every second pixel
  (never interpolated: an average of two indices is a third class). zlib, lossless.
- ``write_probability_tiff``: per-class uint8 probability planes (probabilities.tiff), an
  OME-TIFF with one channel per class named after it, reduced levels as SubIFDs (2x2 means).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core.fileio import commit_file, tmp_path


def _levels(image: np.ndarray, tile: int, reduce) -> list[np.ndarray]:
    levels = [image]
    while min(levels[-1].shape[:2]) > 1 and max(levels[-1].shape[:2]) > 2 * tile:
        levels.append(reduce(levels[-1]))
    return levels


def _resolution(mpp: float | None, full_width: int, width: int) -> dict:
    if not mpp:
        return {}
    scale = mpp * (full_width / width)
    return {"resolution": (1e4 / scale, 1e4 / scale), "resolutionunit": "CENTIMETER"}


def _commit(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_index_tiff(path: str | Path, indices: np.ndarray, palette, mpp: float | None, tile: int = 256) -> None:
    """(H, W) uint8 class indices as a tiled pyramidal palette TIFF (atomically written);
    ``palette``: the colour of index i (at most 256 colours, the rest black)."""
    import tifffile

    colormap = np.zeros((3, 256), np.uint16)
    colours = np.asarray(palette, np.uint16).reshape(-1, 3)[:256]
    colormap[:, : len(colours)] = colours.T * 257  # 16-bit colormap entries
    levels = _levels(np.ascontiguousarray(indices, np.uint8), tile, lambda a: np.ascontiguousarray(a[::2, ::2]))

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for number, level in enumerate(levels):
                tif.write(
                    level,
                    tile=(tile, tile),
                    photometric="palette",
                    colormap=colormap,
                    compression="zlib",
                    subfiletype=1 if number else 0,
                    metadata=None,
                    **_resolution(mpp, indices.shape[1], level.shape[1]),
                )

    _commit(Path(path), write)


def write_probability_tiff(
    path: str | Path, planes: np.ndarray, names: list[str], mpp: float | None, tile: int = 256
) -> None:
    """(C, H, W) uint8 planes (probability x 255) as a tiled pyramidal OME-TIFF, channel c
    named ``names[c]`` (atomically written)."""
    import tifffile

    def halve(a):  # 2x2 means, odd edges kept
        h, w = a.shape[1:]
        padded = np.pad(a.astype(np.uint16), ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
        return (
            (padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2] + 2) // 4
        ).astype(np.uint8)

    levels = _levels(
        np.ascontiguousarray(planes, np.uint8).transpose(1, 2, 0),
        tile,
        lambda a: halve(a.transpose(2, 0, 1)).transpose(1, 2, 0),
    )
    levels = [np.ascontiguousarray(level.transpose(2, 0, 1)) for level in levels]
    # OME files carry a UUID, random unless given: one from the content keeps reruns byte-identical
    digest = hashlib.sha256(np.ascontiguousarray(planes).tobytes() + json.dumps([names, mpp]).encode()).hexdigest()
    meta = {"axes": "CYX", "Channel": {"Name": list(names)}, "UUID": f"urn:uuid:{uuid.UUID(digest[:32])}"}
    if mpp:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=False, ome=True) as tif:
            tif.write(
                levels[0],
                tile=(tile, tile),
                photometric="minisblack",
                compression="zlib",
                subifds=len(levels) - 1,
                metadata=meta,
                **_resolution(mpp, planes.shape[2], planes.shape[2]),
            )
            for level in levels[1:]:
                tif.write(
                    level,
                    tile=(tile, tile),
                    photometric="minisblack",
                    compression="zlib",
                    subfiletype=1,
                    metadata=None,
                    **_resolution(mpp, planes.shape[2], level.shape[2]),
                )

    _commit(Path(path), write)


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    compression: str = "jpeg",
    nearest: bool = False,
) -> None:
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
                tif.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression=compression,
                    subfiletype=1 if number else 0,
                    metadata=None,
                    **res,
                )
        commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
