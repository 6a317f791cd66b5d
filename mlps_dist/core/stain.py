"""Stain normalisation of H&E images to a reference fitted on the training patches.

    ref = fit_reference("macenko", train_images)          # once per run, stored with it
    normaliser = StainNormaliser(ref)
    rgb = normaliser(rgb)                                  # (H, W, 3) uint8 -> uint8, same size

Why: tissue of another laboratory or scanner differs from the training tiles mostly in the
amount and hue of its stains (one measured set had about half the optical density). A model
that has only seen one lab's colours then fails entirely. Each image is mapped onto the
training set's stain vectors and stain amounts before anything else sees it, identically in
training, the mask pass and every prediction path (numpy only: the torch-free deployment
runs the same function).

Methods:
- ``macenko`` (Macenko et al. 2009): per image, the two stain vectors are the extreme angles
  (1st/99th percentile) of the tissue pixels' optical densities in the plane of their two
  principal directions; stain concentrations by least squares; each stain's 99th-percentile
  concentration is scaled to the reference's and the image rebuilt with the reference
  vectors. An image with too little tissue, or whose two vectors are nearly parallel (a patch
  of one stain: lymphocytes, stroma), is deconvolved with the reference vectors instead of
  its own unreliable estimate, so only the amounts are matched.
- ``reinhard`` (Reinhard et al. 2001): the mean and spread of each channel of the
  perception-based l-alpha-beta space over the tissue pixels matched to the reference's.
  Cheap; it moves colour statistics, not stains.

Statistics come from tissue pixels only (optical density above ``OD_TISSUE`` in some
channel: pale eosin absorbs little red or blue). Macenko rebuilds every pixel (glass has stain amounts near 0 and
stays white);
Reinhard changes tissue pixels only. So white background stays white for the mask pass's
white channel and for ignore regions.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("none", "macenko", "reinhard", "od_match")  # od_match: core/stain_match.py
PER_IMAGE_METHODS = ("macenko", "reinhard")
OD_TISSUE = 0.15  # a pixel is tissue when its optical density exceeds this in some channel
MIN_TISSUE = 64  # fewer tissue pixels than this: nothing to estimate from
MIN_ANGLE_DEG = 8.0  # estimated H and E vectors closer than this: a single-stain image
# Stain amounts are scaled by at most this factor (or its inverse). A patch of one pale tissue
# (mucus, debris) looks like a pale stain: scaling it fully to the reference's amounts makes it
# look like dense tissue and costs more than it gains (a frozen-feature probe on tiles of unseen
# images: 67.6 % at 4, 69.4 % at 2, 72.7 % at 1.5, 72.2 % without normalisation; the same tiles
# at 0.55x optical density: 68.5, 74.1, 75.9 and 54.6 %). Augmentation covers the rest.
MAX_SCALE = 1.5
PERCENTILE = 99.0

# l-alpha-beta (Ruderman et al. 1998) as used by Reinhard: RGB -> LMS -> log10 -> decorrelated.
_LMS_FROM_RGB = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LAB_FROM_LOGLMS = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64
)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> optical density (..., 3) float64; white (255) is 0."""
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def from_optical_density(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def tissue_pixels(od: np.ndarray) -> np.ndarray:
    """Boolean mask over the flattened pixels of (N, 3) optical densities."""
    return od.max(axis=1) > OD_TISSUE


def macenko_vectors(od_tissue: np.ndarray) -> np.ndarray | None:
    """(2, 3) unit stain vectors (haematoxylin first) from (N, 3) tissue optical densities;
    None when there is too little tissue or the two directions are nearly parallel."""
    if len(od_tissue) < MIN_TISSUE:
        return None
    _, vecs = np.linalg.eigh(np.cov(od_tissue, rowvar=False))
    plane = vecs[:, [2, 1]]  # the two largest principal directions
    plane = plane * np.where(plane[0] < 0, -1.0, 1.0)  # point into positive optical density
    proj = od_tissue @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [100 - PERCENTILE, PERCENTILE])
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    # haematoxylin absorbs red most: the vector with the larger red component comes first
    pair = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    pair = np.abs(pair) / np.linalg.norm(pair, axis=1, keepdims=True)
    cos = float(np.clip(pair[0] @ pair[1], -1.0, 1.0))
    if math.degrees(math.acos(cos)) < MIN_ANGLE_DEG:
        return None
    return pair


def concentrations(od: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(N, 3) optical densities -> (N, 2) least-squares stain amounts for (2, 3) vectors."""
    return od @ np.linalg.pinv(vectors)


def _lab(rgb_flat: np.ndarray) -> np.ndarray:
    lms = np.maximum(rgb_flat.astype(np.float64) / 255.0 @ _LMS_FROM_RGB.T, 1e-4)
    return np.log10(lms) @ _LAB_FROM_LOGLMS.T


def _rgb_from_lab(lab: np.ndarray) -> np.ndarray:
    lms = 10.0 ** (lab @ np.linalg.inv(_LAB_FROM_LOGLMS).T)
    return np.clip(np.rint(lms @ np.linalg.inv(_LMS_FROM_RGB).T * 255.0), 0, 255).astype(np.uint8)


def image_statistics(method: str, rgb: np.ndarray) -> dict | None:
    """What the reference is fitted from, for one image; None without enough tissue."""
    flat = rgb.reshape(-1, 3)
    od = optical_density(flat)
    tissue = tissue_pixels(od)
    if tissue.sum() < MIN_TISSUE:
        return None
    if method == "macenko":
        vectors = macenko_vectors(od[tissue])
        if vectors is None:
            return None
        amounts = concentrations(od[tissue], vectors)
        return {"vectors": vectors, "max": np.percentile(amounts, PERCENTILE, axis=0)}
    lab = _lab(flat[tissue])
    return {"mean": lab.mean(axis=0), "std": lab.std(axis=0)}


def fit_reference(method: str, images) -> dict:
    """The reference of ``method`` from an iterable of (H, W, 3) uint8 training images: the
    median of the per-image statistics (robust to a few odd patches). JSON-ready."""
    if method not in PER_IMAGE_METHODS:
        raise ValueError(
            f"unknown stain method '{method}' for fit_reference: it fits {' and '.join(PER_IMAGE_METHODS)} "
            f"(od_match: stain_match.fit_od_match)"
        )
    stats = [s for s in (image_statistics(method, rgb) for rgb in images) if s is not None]
    if not stats:
        raise ValueError(
            "no training image has enough tissue (and, for macenko, two distinct stains) "
            "to fit a stain reference; set data.stain.method to none"
        )
    ref = {"method": method, "images": len(stats), "max_scale": MAX_SCALE}  # the run keeps its own limit
    for key in stats[0]:
        value = np.median(np.stack([s[key] for s in stats]), axis=0)
        if key == "vectors":
            value = value / np.linalg.norm(value, axis=1, keepdims=True)
        ref[key] = value.tolist()
    return ref


class StainNormaliser:
    """Maps (H, W, 3) uint8 images onto a reference from ``fit_reference``."""

    default_scope = "image"  # each image estimated on its own unless a path asks for its set

    def __init__(self, reference: dict):
        self.method = reference["method"]
        if self.method not in PER_IMAGE_METHODS:
            raise ValueError(f"stain reference has unknown method '{self.method}'")
        self.reference = reference
        self.max_scale = float(reference.get("max_scale", MAX_SCALE))
        if self.method == "macenko":
            self.vectors = np.asarray(reference["vectors"], dtype=np.float64)
            self.max = np.asarray(reference["max"], dtype=np.float64)
        else:
            self.mean = np.asarray(reference["mean"], dtype=np.float64)
            self.std = np.asarray(reference["std"], dtype=np.float64)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1, 3)
        od = optical_density(flat)
        tissue = tissue_pixels(od)
        if tissue.sum() < MIN_TISSUE:
            return np.asarray(rgb, dtype=np.uint8)
        if self.method == "macenko":
            return self._macenko(od, tissue).reshape(rgb.shape)
        out = flat.copy()
        out[tissue] = self._reinhard(flat[tissue])
        return out.reshape(rgb.shape)

    def estimate(self, rgb: np.ndarray) -> dict | None:
        """The per-image part of ``__call__`` (the image's own stain vectors and amounts, or its
        colour statistics) from (H, W, 3) or (N, 3) uint8 pixels; None with too little tissue.
        ``apply(band, estimate(sample))`` then normalises an image band by band (infer's
        streamed path), the estimate taken from a sample of the whole image."""
        flat = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1, 3)
        od = optical_density(flat)
        tissue = tissue_pixels(od)
        if tissue.sum() < MIN_TISSUE:
            return None
        if self.method == "reinhard":
            lab = _lab(flat[tissue])
            return {"mean": lab.mean(axis=0), "std": np.maximum(lab.std(axis=0), 1e-6)}
        vectors = macenko_vectors(od[tissue])
        if vectors is None:
            vectors = self.vectors
        peak = np.percentile(concentrations(od[tissue], vectors), PERCENTILE, axis=0)
        scale = np.where(peak > 1e-6, self.max / np.maximum(peak, 1e-6), 1.0)
        return {"vectors": vectors, "scale": np.clip(scale, 1 / self.max_scale, self.max_scale)}

    def apply(self, rgb: np.ndarray, estimate: dict | None) -> np.ndarray:
        """(H, W, 3) uint8 normalised with an ``estimate`` of its whole image (pixel by pixel)."""
        if estimate is None:
            return np.asarray(rgb, dtype=np.uint8)
        flat = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1, 3)
        od = optical_density(flat)
        if self.method == "macenko":
            amounts = concentrations(od, estimate["vectors"]) * estimate["scale"]
            return from_optical_density(np.maximum(amounts, 0.0) @ self.vectors).reshape(rgb.shape)
        tissue = tissue_pixels(od)
        lab = _lab(flat[tissue])
        gain = np.clip(self.std / estimate["std"], 1 / self.max_scale, self.max_scale)
        out = flat.copy()
        out[tissue] = _rgb_from_lab((lab - estimate["mean"]) * gain + self.mean)
        return out.reshape(rgb.shape)

    def tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Channels-first uint8 tiles (N, 3, H, W), each normalised on its own."""
        return np.stack([self(t.transpose(1, 2, 0)).transpose(2, 0, 1) for t in tiles])

    def _macenko(self, od: np.ndarray, tissue: np.ndarray) -> np.ndarray:
        """Estimated on the tissue, applied to every pixel: glass has stain amounts near 0 and
        stays near white, and pale tissue just under the tissue threshold moves with the rest."""
        vectors = macenko_vectors(od[tissue])
        if vectors is None:  # one stain: keep the reference's directions, match the amount only
            vectors = self.vectors
        amounts = concentrations(od, vectors)
        peak = np.percentile(amounts[tissue], PERCENTILE, axis=0)
        scale = np.where(peak > 1e-6, self.max / np.maximum(peak, 1e-6), 1.0)
        amounts = amounts * np.clip(scale, 1 / self.max_scale, self.max_scale)
        return from_optical_density(np.maximum(amounts, 0.0) @ self.vectors)

    def _reinhard(self, rgb_tissue: np.ndarray) -> np.ndarray:
        lab = _lab(rgb_tissue)
        std = np.maximum(lab.std(axis=0), 1e-6)
        lab = (lab - lab.mean(axis=0)) * np.clip(self.std / std, 1 / self.max_scale, self.max_scale) + self.mean
        return _rgb_from_lab(lab)
