"""Stain normalisation of a whole slide: estimated once on its tissue, applied to every tile.

A run trained with ``data.stain.method`` != none normalises each image onto its stain
reference (mlps_dist/core/stain.py). Estimated tile by tile, a slide's tiles would each get their
own stain vectors and amounts: a tile of mostly stroma or of lymphocytes looks like a pale
or a dark stain and is pushed towards the reference's mix, so the same tissue is coloured
differently from tile to tile. Here the slide's vectors and amounts are estimated once, from
up to SAMPLE_TILES tiles spread evenly over its tissue (read exactly as the model's tiles
are), and every tile is mapped with that one estimate (``StainNormaliser.apply``).

    record = estimate_slide_stain(normaliser, read_tile, origins)   # pass 1, into meta.json
    stain = SlideStain(normaliser, record)                          # pass 2, every rank
    tiles = stain.tiles(tiles)                                      # (N, 3, P, P) uint8

The record (summary.json ``stain``) holds the method, ``scope`` ("slide"; "tile" when the
sampled tissue was too little to estimate from, or with ``--stain-scope tile``), the tiles
sampled and the estimate itself (Macenko: the slide's stain vectors and the scale of each
stain's amount; Reinhard: the mean and spread of the l-alpha-beta channels). Numpy only.
"""

from __future__ import annotations

import numpy as np

SAMPLE_TILES = 32  # tiles read to estimate a slide's stains
MAX_PIXELS = 2_000_000  # pixels the estimate uses at most (every k-th of the sample)


def sample_origins(origins: list, count: int = SAMPLE_TILES) -> list:
    """Up to ``count`` origins spread evenly over the (row-major) list."""
    if len(origins) <= count:
        return list(origins)
    return [origins[round(i * (len(origins) - 1) / (count - 1))] for i in range(count)]


def estimate_slide_stain(normaliser, read_tile, origins: list) -> dict:
    """The slide's stain record from the tiles ``read_tile(origin) -> (P, P, 3) uint8`` of
    a sample of ``origins`` (tiles touching tissue)."""
    sample = sample_origins(origins)
    record = {"method": normaliser.method, "scope": "slide", "tiles": len(sample)}
    if not sample:
        return {**record, "scope": "tile", "reason": "no tissue tiles"}
    pixels = np.concatenate([read_tile(o).reshape(-1, 3) for o in sample])
    if len(pixels) > MAX_PIXELS:
        pixels = pixels[:: -(-len(pixels) // MAX_PIXELS)]
    estimate = normaliser.estimate(pixels)
    if estimate is None:
        return {
            **record,
            "scope": "tile",
            "reason": "too little tissue in the sampled tiles: each tile is normalised on its own",
        }
    return {**record, "estimate": {k: np.asarray(v, np.float64).round(6).tolist() for k, v in estimate.items()}}


class SlideStain:
    """Tiles normalised with the slide's estimate (or each on its own for scope "tile")."""

    def __init__(self, normaliser, record: dict | None):
        self.normaliser = normaliser
        estimate = (record or {}).get("estimate") if (record or {}).get("scope") == "slide" else None
        self.estimate = {k: np.asarray(v, np.float64) for k, v in estimate.items()} if estimate else None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.estimate is None:
            return self.normaliser(rgb)
        return self.normaliser.apply(rgb, self.estimate)

    def tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Channels-first uint8 tiles (N, 3, P, P)."""
        return np.stack([self(t.transpose(1, 2, 0)).transpose(2, 0, 1) for t in tiles])


class StainPlan:
    """What pass 1 needs to estimate a slide's stains: the model's normaliser and tile grid."""

    def __init__(self, normaliser, model, map_mpp: float, stride: int):
        self.normaliser, self.model, self.map_mpp, self.stride = normaliser, model, map_mpp, stride

    def estimate(self, slide, tissue: np.ndarray) -> dict:
        """The record of an open ``Slide`` whose tissue mask (at ``map_mpp``) is given."""
        from mlps_dist.slides.stitch import geometry

        geo = geometry(
            slide.name,
            slide.width,
            slide.height,
            slide.mpp,
            self.map_mpp,
            self.model.patch_size,
            self.model.mpp,
            self.stride,
        )
        patch = self.model.patch_size
        return estimate_slide_stain(
            self.normaliser, lambda o: slide.read(o[0] * geo.px0, o[1] * geo.px0, geo.size0, patch), geo.origins(tissue)
        )
