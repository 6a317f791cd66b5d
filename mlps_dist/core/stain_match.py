"""Stain matching of a whole set of images, and the stain objects every prediction path holds.

    ref = fit_od_match(train_images)                       # once per run (data.stain.method: od_match)
    matcher = create_stain(ref)                            # or a StainNormaliser for macenko/reinhard
    fixed = SetStain(matcher, matcher.estimate(set_pixels(images)))   # one estimate for the set
    rgb = fixed(rgb)                                       # every image of the set, the same map

Why a set, not an image. A single patch cannot tell a pale stain from pale tissue: a patch of
mucus or loose stroma has little optical density whatever lab stained it, and normalising it on
its own makes it look like dense tissue. A set of patches of one lab (an evaluation split, the
folder given to one ``infer`` call, one slide) holds every kind of tissue, so its mean optical
density is the lab's stain strength and scanner, and one map for the whole set moves every patch
alike. Measured on mosaics of real tissue with the demo's from-scratch networks (no retraining):
test patches of an unseen image at about half the training optical density scored 9.0 % mIoU as
they are and 44.1 % matched (the unchanged patches 41.9 % and 44.4 %; docs/real_tissue.md).

``od_match``: the mean optical density of the set's tissue pixels, per RGB channel, is scaled to
the training patches' (one gain per channel, clipped to ``MAX_GAIN``). Scaling optical density
keeps white glass white (density 0) and keeps the ratios of stains within a channel; the per-
channel gains also correct a moderate hue change of the stains. The training patches are the
reference and stay exactly as they are (gain 1), so a run's training, CAMs and masks do not
change and the same map could be applied to any model.
"""

from __future__ import annotations

import numpy as np

from mlps_dist.core.stain import MIN_TISSUE, StainNormaliser, from_optical_density, optical_density, tissue_pixels

MAX_GAIN = 4.0  # a set's optical density is moved at most 4x either way (measured sets: 0.4-0.6x)
SET_IMAGES = 256  # images a set's estimate is taken from, spread evenly over the set
IMAGE_PIXELS = 65536  # pixels taken from each of them, on a regular grid


class OpticalDensityMatcher:
    """``od_match``: one gain per RGB channel of optical density, from a set's tissue pixels."""

    method = "od_match"
    default_scope = "set"  # infer and evaluation estimate once per set of images

    def __init__(self, reference: dict):
        if reference.get("method") != self.method:
            raise ValueError(f"stain reference has method '{reference.get('method')}', expected '{self.method}'")
        self.reference = reference
        self.mean_od = np.asarray(reference["mean_od"], dtype=np.float64)
        self.max_gain = float(reference.get("max_gain", MAX_GAIN))

    def estimate(self, pixels: np.ndarray) -> dict | None:
        """The gains for (..., 3) uint8 pixels of a set (or of one image); None with too little
        tissue to say (the images are then left as they are)."""
        mean = mean_tissue_od(pixels)
        if mean is None:
            return None
        gain = np.clip(self.mean_od / np.maximum(mean, 1e-6), 1 / self.max_gain, self.max_gain)
        return {"gain": gain.tolist()}

    def apply(self, rgb: np.ndarray, estimate: dict | None) -> np.ndarray:
        """(..., 3) uint8 with every pixel's optical density scaled by the estimate's gains."""
        if estimate is None:
            return np.asarray(rgb, dtype=np.uint8)
        gain = np.asarray(estimate["gain"], dtype=np.float64)
        return from_optical_density(optical_density(rgb) * gain)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """One image matched on its own (``--stain-scope image``)."""
        return self.apply(rgb, self.estimate(rgb))

    def tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Channels-first uint8 tiles (N, 3, H, W), each matched on its own."""
        return np.stack([self(t.transpose(1, 2, 0)).transpose(2, 0, 1) for t in tiles])


class SetStain:
    """A stain object with one estimate for every image it sees: a set matched as a whole.
    Same interface as the per-image objects, so the prediction paths take either."""

    default_scope = "set"

    def __init__(self, stain, estimate: dict | None):
        self.stain, self.fixed = stain, estimate
        self.method, self.reference = stain.method, stain.reference

    def estimate(self, pixels: np.ndarray) -> dict | None:
        """The set's estimate, whatever image is asked about."""
        return self.fixed

    def apply(self, rgb: np.ndarray, estimate: dict | None) -> np.ndarray:
        return self.stain.apply(rgb, estimate)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.stain.apply(rgb, self.fixed)

    def tiles(self, tiles: np.ndarray) -> np.ndarray:
        return np.stack([self(t.transpose(1, 2, 0)).transpose(2, 0, 1) for t in tiles])


def mean_tissue_od(pixels: np.ndarray) -> np.ndarray | None:
    """Mean optical density per channel over the tissue among (..., 3) uint8 pixels."""
    od = optical_density(np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, 3))
    tissue = tissue_pixels(od)
    if tissue.sum() < MIN_TISSUE:
        return None
    return od[tissue].mean(axis=0)


def grid_pixels(rgb: np.ndarray, limit: int = IMAGE_PIXELS) -> np.ndarray:
    """(N, 3) pixels of an (H, W, 3) image on a regular grid, at most about ``limit``."""
    h, w = rgb.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / limit))))
    return np.ascontiguousarray(rgb[::step, ::step]).reshape(-1, 3)


def spread(count: int, limit: int = SET_IMAGES) -> list[int]:
    """Indices of at most ``limit`` items spread evenly over ``count`` (all of them when fewer)."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def set_pixels(images, limit: int = IMAGE_PIXELS) -> np.ndarray:
    """The pixels a set's estimate is taken from: a grid sample of each (H, W, 3) image."""
    picked = [grid_pixels(rgb, limit) for rgb in images]
    return np.concatenate(picked) if picked else np.zeros((0, 3), dtype=np.uint8)


def fit_od_match(images) -> dict:
    """The ``od_match`` reference from training images: their tissue pixels' mean optical
    density per channel, estimated exactly as any set's is. JSON-ready."""
    picked = [grid_pixels(rgb) for rgb in images]
    mean = mean_tissue_od(np.concatenate(picked)) if picked else None
    if mean is None:
        raise ValueError(
            "the training patches hold too little tissue to fit a stain reference; set data.stain.method to none"
        )
    return {"method": "od_match", "images": len(picked), "mean_od": mean.tolist(), "max_gain": MAX_GAIN}


def create_stain(reference: dict | None):
    """The stain object of a stored reference (RUN/classifier/stain.json, model.json's
    ``stain``): None when there is none."""
    if not reference:
        return None
    if reference.get("method") == OpticalDensityMatcher.method:
        return OpticalDensityMatcher(reference)
    return StainNormaliser(reference)


def for_set(stain, scope: str, images) -> object:
    """``stain`` with one estimate from ``images`` (an iterable of (H, W, 3) uint8) when
    ``scope`` is ``set``; as it is (each image on its own) for ``image``."""
    if stain is None or scope == "image":
        return stain
    if scope != "set":
        raise ValueError(f"stain scope '{scope}': use set or image")
    return SetStain(stain, stain.estimate(set_pixels(images)))
