"""Stitching tile predictions into a class map of the whole slide at ``map_mpp``.

Geometry: the map has one pixel per ``map_mpp`` microns. A tile covers ``n`` x ``n`` map
pixels with ``n = round(patch * model_mpp / map_mpp)`` and starts on a map pixel, so it is
read as the level-0 box of ``n * map_mpp / slide_mpp`` pixels resampled to the model's
``patch`` (the model sees ``n * map_mpp / patch`` um/px, the training MPP up to the
rounding of ``n``). Tiles step by ``stride`` model pixels; only tiles touching tissue are
predicted.

Per-class scores (softmax after the gate) are area-averaged to ``n x n`` and added into a
(C, H, W) accumulator with a window that weighs the tile centre most (sin^2 with a small
floor, so borders of the slide still count): where tiles overlap, the centre of one tile
outweighs the border of its neighbour and tile seams do not show. The accumulator is at
map resolution, so its size does not depend on the slide's pixel count at level 0.

This module imports no torch: the model behind the scores is any ``SlideModel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mlps_dist.slides.grid import grid_origins

WEIGHT_FLOOR = 1e-3


class SlideModel(Protocol):
    """What segment_slides needs of a model (a trained run, or an exported deployment model)."""

    classes: list[str]
    palette: list[tuple[int, int, int]]  # C + 1 colours, the last for ignore/no tissue
    mpp: float | None  # microns per pixel the model was trained at (None: unknown)
    patch_size: int  # side of the training patches
    # Optional: ``stain``, the run's stain.StainNormaliser (None or absent: none). A model with
    # one also takes ``scores(..., stain=False)`` for tiles the caller normalised itself.

    def scores(self, tiles: np.ndarray, out_size: int) -> np.ndarray:
        """uint8 (N, 3, patch, patch) -> float32 (N, C, out_size, out_size) class scores."""


@dataclass
class SlideGeometry:
    name: str
    width: int  # level-0 size
    height: int
    mpp: float  # level-0 um/px
    map_w: int
    map_h: int
    map_mpp: float
    n: int  # tile side in map pixels
    step: int  # tile stride in map pixels

    @property
    def px0(self) -> float:
        """Level-0 pixels per map pixel."""
        return self.map_mpp / self.mpp

    @property
    def size0(self) -> float:
        return self.n * self.px0

    def origins(self, tissue: np.ndarray) -> list[tuple[int, int]]:
        """Map-pixel origins (x, y) of the tiles that touch tissue, row-major."""
        integral = np.pad(tissue.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        keep = []
        for y in grid_origins(self.map_h, self.n, self.step):
            for x in grid_origins(self.map_w, self.n, self.step):
                y1, x1 = min(y + self.n, self.map_h), min(x + self.n, self.map_w)
                if integral[y1, x1] - integral[y, x1] - integral[y1, x] + integral[y, x] > 0:
                    keep.append((x, y))
        return keep


def tile_side(patch: int, model_mpp: float, map_mpp: float) -> int:
    return max(1, int(round(patch * model_mpp / map_mpp)))


def geometry(
    name: str, width: int, height: int, mpp: float, map_mpp: float, patch: int, model_mpp: float, stride: int
) -> SlideGeometry:
    scale = mpp / map_mpp
    n = tile_side(patch, model_mpp, map_mpp)
    step = max(1, int(round(stride * model_mpp / map_mpp)))
    return SlideGeometry(
        name,
        width,
        height,
        mpp,
        max(1, math.ceil(width * scale)),
        max(1, math.ceil(height * scale)),
        map_mpp,
        n,
        min(step, n),
    )


def tile_weights(n: int) -> np.ndarray:
    ramp = np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2
    return (np.outer(ramp, ramp) + WEIGHT_FLOOR).astype(np.float32)


class Accumulator:
    """Weighted score sums over the bounding box of the tiles added (map pixels)."""

    def __init__(self, num_classes: int, geo: SlideGeometry, origins: list[tuple[int, int]]):
        xs = [x for x, _ in origins] or [0]
        ys = [y for _, y in origins] or [0]
        self.x0, self.y0 = min(xs), min(ys)
        self.x1, self.y1 = min(max(xs) + geo.n, geo.map_w), min(max(ys) + geo.n, geo.map_h)
        self.sums = np.zeros((num_classes, self.y1 - self.y0, self.x1 - self.x0), np.float32)
        self.weight = np.zeros((self.y1 - self.y0, self.x1 - self.x0), np.float32)
        self.window = tile_weights(geo.n)

    def add(self, scores: np.ndarray, origins: list[tuple[int, int]]) -> None:
        for tile, (x, y) in zip(scores, origins):
            h, w = min(tile.shape[1], self.y1 - y), min(tile.shape[2], self.x1 - x)
            ty, tx = y - self.y0, x - self.x0
            win = self.window[:h, :w]
            self.sums[:, ty : ty + h, tx : tx + w] += tile[:, :h, :w] * win
            self.weight[ty : ty + h, tx : tx + w] += win

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums, "weight": self.weight, "box": np.array([self.x0, self.y0, self.x1, self.y1])}


def merge_partials(num_classes: int, geo: SlideGeometry, partials) -> tuple[np.ndarray, np.ndarray]:
    """Sum partial accumulators (dicts from ``Accumulator.arrays`` or loaded npz) into the
    whole map: (sums (C, H, W), weight (H, W))."""
    sums = np.zeros((num_classes, geo.map_h, geo.map_w), np.float32)
    weight = np.zeros((geo.map_h, geo.map_w), np.float32)
    for part in partials:
        x0, y0, x1, y1 = (int(v) for v in part["box"])
        sums[:, y0:y1, x0:x1] += part["sums"]
        weight[y0:y1, x0:x1] += part["weight"]
    return sums, weight


def class_map(sums: np.ndarray, weight: np.ndarray, tissue: np.ndarray, ignore: int) -> np.ndarray:
    """uint8 (H, W): argmax of the weighted mean scores; ``ignore`` off tissue or unpredicted."""
    out = sums.argmax(0).astype(np.uint8)
    out[(weight <= 0) | ~tissue] = ignore
    return out


def area_summary(classes_map: np.ndarray, tissue: np.ndarray, classes: list[str], map_mpp: float) -> dict:
    px_mm2 = (map_mpp / 1000.0) ** 2
    counts = np.bincount(classes_map.ravel(), minlength=len(classes) + 1)
    return {
        "tissue_mm2": round(float(tissue.sum()) * px_mm2, 6),
        "area_mm2": {c: round(float(counts[i]) * px_mm2, 6) for i, c in enumerate(classes)},
    }


def probabilities(sums: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The weighted mean scores (C, H, W), computed in place in ``sums`` (0 where no tile
    was predicted)."""
    np.divide(sums, np.maximum(weight, 1e-12)[None], out=sums)
    sums[:, weight <= 0] = 0
    return sums
