"""Tissue detection on a low-resolution image of the slide.

Stained tissue is coloured, glass is grey-white: Otsu's threshold on the HSV saturation
separates them (with a floor, so a slide that is almost all glass does not turn its noise
into tissue). Closing then opening with a disc removes speckle and bridges thin gaps, and
connected pieces smaller than ``min_area_mm2`` (dust, debris) are dropped. The cleanup runs
at MORPHOLOGY_MPP (8 um/px) or coarser whatever the image's resolution, so a fine map costs
time linear in its pixels.

    mask = detect_tissue(rgb, mpp=8.0)            # (H, W) bool at the image's resolution
    TissueMap(mask, mpp=8.0).fraction(x0, y0, size0, slide_mpp)   # share of a level-0 box
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SATURATION_FLOOR = 0.07  # below this, a pixel is glass whatever Otsu says
CLEANUP_RADIUS_UM = 24.0  # disc radius of the closing/opening, in microns
MIN_AREA_MM2 = 0.01  # smallest piece of tissue kept (0.1 mm x 0.1 mm)
MORPHOLOGY_MPP = 8.0  # the cleanup runs at this resolution or coarser (see detect_tissue)


def saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold in [0, 1] maximising the between-class variance of ``values``."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centres) / np.maximum(weight0, 1)
    mean1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _disc(radius: int) -> np.ndarray:
    r = max(0, int(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r + 0.5


def detect_tissue(
    rgb: np.ndarray, mpp: float, min_area_mm2: float = MIN_AREA_MM2, cleanup_um: float = CLEANUP_RADIUS_UM
) -> np.ndarray:
    """(H, W) bool tissue mask of an (H, W, 3) uint8 image at ``mpp`` um/px.

    The threshold is taken at the image's own resolution; the cleanup runs at MORPHOLOGY_MPP
    or coarser (an image finer than half of it is reduced by whole blocks, a pixel of the
    coarse mask being tissue where most of its block is) and the cleaned mask is enlarged back
    (nearest). So the cost is linear in the pixels whatever the resolution: a disc of
    ``cleanup_um`` at 1 um/px would otherwise cost 24^2 operations per pixel, and (1/mpp)^4 in
    all. The mask's edges are then those of MORPHOLOGY_MPP blocks, below the disc's size."""
    sat = saturation(rgb)
    mask = sat > max(otsu_threshold(sat), SATURATION_FLOOR)
    del sat
    # "finer than half": a map at 4 um/px or coarser is cleaned as it is
    factor = int(MORPHOLOGY_MPP // mpp) if 0 < mpp < MORPHOLOGY_MPP / 2 else 1
    if factor < 2:
        return _clean(mask, mpp, min_area_mm2, cleanup_um)
    h, w = mask.shape
    padded = np.pad(mask, ((0, -h % factor), (0, -w % factor)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    coarse = blocks.sum(axis=(1, 3), dtype=np.int32) * 2 > factor * factor
    coarse = _clean(coarse, mpp * factor, min_area_mm2, cleanup_um)
    return np.repeat(np.repeat(coarse, factor, axis=0), factor, axis=1)[:h, :w]


def _clean(mask: np.ndarray, mpp: float, min_area_mm2: float, cleanup_um: float) -> np.ndarray:
    """Closing then opening with a disc of ``cleanup_um``, then pieces under ``min_area_mm2`` dropped."""
    from scipy import ndimage

    radius = int(round(cleanup_um / mpp))
    if radius >= 1:
        disc = _disc(radius)
        # Pad so the closing does not eat tissue at the image border.
        padded = np.pad(mask, radius, mode="edge")
        padded = ndimage.binary_closing(padded, disc)
        mask = ndimage.binary_opening(padded, disc)[radius:-radius, radius:-radius]
    min_pixels = min_area_mm2 * 1e6 / (mpp * mpp)
    if min_pixels > 1:
        labels, count = ndimage.label(mask)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            keep = sizes >= min_pixels
            keep[0] = False
            mask = keep[labels]
    return mask


@dataclass
class TissueMap:
    """A tissue mask at ``mpp`` um/px covering the slide from level-0 (0, 0)."""

    mask: np.ndarray  # (H, W) bool
    mpp: float

    def fraction(self, x0: float, y0: float, size0: float, slide_mpp: float) -> float:
        """Share of tissue in the level-0 square (x0, y0, size0), measured on the mask."""
        scale = slide_mpp / self.mpp  # mask pixels per level-0 pixel
        left, top = int(np.floor(x0 * scale)), int(np.floor(y0 * scale))
        right = max(left + 1, int(np.ceil((x0 + size0) * scale)))
        bottom = max(top + 1, int(np.ceil((y0 + size0) * scale)))
        window = self.mask[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)]
        area = (right - left) * (bottom - top)  # outside the slide counts as glass
        return float(window.sum()) / area if area else 0.0

    def png_bytes(self) -> bytes:
        from mlps_dist.core import png

        return png.encode(self.mask.astype(np.uint8) * 255)
