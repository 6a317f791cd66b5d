"""Per-sample augmentation parameters and their numpy implementation.

Parameters derive from (seed, epoch, sample index) only, so they are the same on every
back end, rank, worker and resume. Geometry is expressed canonically as
``transpose?`` then ``horizontal flip?`` then ``vertical flip?`` (the eight symmetries of
the square); the user's hflip/vflip/rot90 choices map onto it. Colour/stain jitter is a
per-channel gain and a common offset, applied to the float image before normalisation:
``out = clip(img * gain[c] + offset * 255, 0, 255)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mlps_dist.config import DataConfig


@dataclass(frozen=True)
class AugParams:
    transpose: bool = False
    hflip: bool = False
    vflip: bool = False
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: float = 0.0

    @property
    def has_colour(self) -> bool:
        return self.gain != (1.0, 1.0, 1.0) or self.offset != 0.0


IDENTITY = AugParams()


def sample_params(cfg: DataConfig, seed: int, epoch: int, index: int) -> AugParams:
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, 1, index]))
    draws = rng.random(7)  # always the same number of draws: switching one option leaves the others
    hflip = bool(cfg.hflip and draws[0] < 0.5)
    vflip = bool(cfg.vflip and draws[1] < 0.5)
    k = int(draws[2] * 4) if cfg.rot90 else 0
    # rot90 by k (counter-clockwise, as np.rot90) == transpose then flips:
    # k=1: T then vflip; k=2: hflip+vflip; k=3: T then hflip. XOR composes them with the
    # random flips; the result is still one of the 8 symmetries, each equally likely.
    transpose = k in (1, 3)
    hflip ^= k in (2, 3)
    vflip ^= k in (1, 2)
    gain, offset = (1.0, 1.0, 1.0), 0.0
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        gain = tuple(float(1.0 + s * (2 * d - 1)) for d in draws[3:6])
        offset = float(0.1 * s * (2 * draws[6] - 1))
    return AugParams(transpose, hflip, vflip, gain, offset)


def geometric(array: np.ndarray, p: AugParams) -> np.ndarray:
    """Apply the geometry to an (H, W[, C]) array; returns a contiguous copy."""
    if p.transpose:
        array = np.swapaxes(array, 0, 1)
    if p.hflip:
        array = array[:, ::-1]
    if p.vflip:
        array = array[::-1]
    return np.ascontiguousarray(array)


def colour(rgb_float: np.ndarray, p: AugParams) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 -> jittered, still 0..255."""
    if not p.has_colour:
        return rgb_float
    out = rgb_float * np.asarray(p.gain, dtype=np.float32) + np.float32(p.offset * 255.0)
    return np.clip(out, 0.0, 255.0)


def normalise(rgb_float: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(H, W, 3) 0..255 -> (3, H, W) float32 normalised."""
    m = np.asarray(mean, dtype=np.float32) * 255.0
    s = np.asarray(std, dtype=np.float32) * 255.0
    return np.ascontiguousarray(((rgb_float - m) / s).transpose(2, 0, 1))


def model_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Normalised patches (B,3,H,W) at the resolution the model was trained on.

    Training resizes patches to ``data.image_size``; evaluation, the mask pass and
    validation feed the model at that same scale (textures keep the size the network
    learnt) and upsample its outputs back to the stored patch and mask size."""
    if not image_size or tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
