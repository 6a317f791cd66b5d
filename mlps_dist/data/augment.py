"""Per-sample augmentation parameters and their numpy implementation.

Parameters derive from (seed, epoch, sample index) and the stage's ``augment`` section
only, so they are the same on every back end, rank, worker and resume. Geometry is
expressed canonically as ``transpose?`` then ``horizontal flip?`` then ``vertical flip?``
(the eight symmetries of the square); the user's hflip/vflip/rot90 choices map onto it.
Masks get the geometry and nothing else. The image then gets, on floats in 0..255:

1. Gaussian blur: a (2h+1)^2 kernel, sigma ~ U(0, blur_radius) with chance blur_prob,
   h = ceil(3 blur_radius), borders reflected without repeating the edge (reflect-101);
2. HED stain jitter (Tellez et al. 2018): RGB -> optical density -> H, E, D stains by the
   Ruifrok-Johnston matrix (skimage's rgb2hed convention: OD = log(max(x/255, 1e-6)) /
   log(1e-6); negative stain values are kept, not clipped to 0 as rgb2hed does, so zero
   jitter is the identity), each stain s -> s * alpha + beta, back to RGB. It is one affine
   map in log space: ``log x' = log x @ A + t`` with A = inv(M) diag(alpha) M, t = (beta @ M) log(1e-6),
   so both back ends apply the same (A, t) computed here. Two stain changes of a whole patch
   fold into the same map: every stain's optical density times one factor (``od_scale``:
   a lab's staining strength or section thickness) and the stain vectors turned about the
   grey axis of optical-density space (``stain_hue``: a stain batch's or scanner's hue),
   ``A -> g A R^T``, ``t -> g t R^T``;
3. colour jitter: ``out = clip(img * gain[c] + offset * 255, 0, 255)``.

Draws: 7 uniforms (flips, turn, colour) as before these options existed, then 8 more
(blur, radius, 3 alphas, 3 betas), then 2 (optical-density scale, hue), always all of
them: for the same settings the earlier draws keep their meaning, and switching one
option leaves the others' draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mlps_dist.config import AugmentConfig

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB), as skimage's rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
LOG_FLOOR = 1e-6  # the smallest transmitted fraction (skimage's 1e-6): keeps log finite at black


@dataclass(frozen=True)
class AugParams:
    transpose: bool = False
    hflip: bool = False
    vflip: bool = False
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: float = 0.0
    blur_sigma: float = 0.0  # 0 = no blur
    blur_half: int = 0  # kernel half-width (fixed per config, so every kernel has one shape)
    hed_alpha: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_beta: tuple[float, float, float] = (0.0, 0.0, 0.0)
    od_scale: float = 1.0  # every stain's optical density times this
    hue_deg: float = 0.0  # stain vectors turned by this about the grey axis

    @property
    def has_colour(self) -> bool:
        return self.gain != (1.0, 1.0, 1.0) or self.offset != 0.0

    @property
    def has_hed(self) -> bool:
        return (
            self.hed_alpha != (1.0, 1.0, 1.0)
            or self.hed_beta != (0.0, 0.0, 0.0)
            or self.od_scale != 1.0
            or self.hue_deg != 0.0
        )


IDENTITY = AugParams()


def blur_half_width(cfg: AugmentConfig) -> int:
    return int(math.ceil(3.0 * cfg.blur_radius)) if cfg.blur_prob > 0 else 0


def sample_params(cfg: AugmentConfig, seed: int, epoch: int, index: int) -> AugParams:
    """``cfg`` is the stage's augment section (classifier.augment or segmenter.augment)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, 1, index]))
    draws = rng.random(7)  # always the same number of draws: switching one option leaves the others
    more = rng.random(8)  # drawn after the first 7, which keep the meaning they had before blur/HED
    stain = rng.random(2)  # after those 15: the optical-density scale and the hue
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
    sigma = float(cfg.blur_radius * more[1]) if cfg.blur_prob > 0 and more[0] < cfg.blur_prob else 0.0
    alpha = tuple(float(1.0 + cfg.hed_jitter * (2 * d - 1)) for d in more[2:5])
    beta = tuple(float(cfg.hed_shift * (2 * d - 1)) for d in more[5:8])
    # log-uniform in [1/(1+s), 1+s]: halving the stain is as likely as doubling it
    od_scale = float(math.exp(math.log1p(cfg.od_scale) * (2 * stain[0] - 1))) if cfg.od_scale > 0 else 1.0
    hue = float(cfg.stain_hue * (2 * stain[1] - 1)) if cfg.stain_hue > 0 else 0.0
    return AugParams(transpose, hflip, vflip, gain, offset, sigma, blur_half_width(cfg), alpha, beta, od_scale, hue)


def blur_kernel(p: AugParams) -> np.ndarray:
    """Normalised 1-D Gaussian of 2 * blur_half + 1 taps; a unit impulse when there is no blur."""
    k = np.zeros(2 * p.blur_half + 1, dtype=np.float64)
    if p.blur_sigma <= 1e-3:  # narrower than a pixel by far: the identity (and no 0/0)
        k[p.blur_half] = 1.0
    else:
        x = np.arange(-p.blur_half, p.blur_half + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / p.blur_sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def blur_kernel_2d(p: AugParams) -> np.ndarray:
    k = blur_kernel(p)
    return np.outer(k, k).astype(np.float32)


def blur(rgb_float: np.ndarray, p: AugParams) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, reflect-101 borders."""
    if p.blur_sigma <= 1e-3 or p.blur_half == 0:
        return rgb_float
    k, h = blur_kernel(p), p.blur_half
    padded = np.pad(rgb_float, ((h, h), (h, h), (0, 0)), mode="reflect")
    rows = sum(k[i] * padded[i : i + rgb_float.shape[0]] for i in range(2 * h + 1))
    return sum(k[i] * rows[:, i : i + rgb_float.shape[1]] for i in range(2 * h + 1)).astype(np.float32)


def grey_axis_rotation(degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about (1, 1, 1) / sqrt(3), for column vectors (Rodrigues)."""
    u = np.full(3, 1.0 / math.sqrt(3.0))
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    theta = math.radians(degrees)
    return math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1.0 - math.cos(theta)) * np.outer(u, u)


def hed_affine(p: AugParams) -> tuple[np.ndarray, np.ndarray]:
    """(A, t) with ``log x' = log x @ A + t`` (x = rgb / 255), float32."""
    a = HED_FROM_RGB @ np.diag(p.hed_alpha) @ RGB_FROM_HED
    t = (np.asarray(p.hed_beta) @ RGB_FROM_HED) * math.log(LOG_FLOOR)
    # log x is optical density times a constant, so scaling and turning it are linear here too
    turn = p.od_scale * grey_axis_rotation(p.hue_deg).T
    return (a @ turn).astype(np.float32), (t @ turn).astype(np.float32)


def hed(rgb_float: np.ndarray, p: AugParams) -> np.ndarray:
    """HED stain jitter of an (H, W, 3) float image in 0..255; still 0..255."""
    if not p.has_hed:
        return rgb_float
    a, t = hed_affine(p)
    log_x = np.log(np.maximum(rgb_float * np.float32(1.0 / 255.0), np.float32(LOG_FLOOR)))
    return np.clip(np.exp(log_x @ a + t) * np.float32(255.0), 0.0, 255.0).astype(np.float32)


def photometric(rgb_float: np.ndarray, p: AugParams) -> np.ndarray:
    """Blur, stain and colour jitter, in that order (the DALI back end follows the same)."""
    return colour(hed(blur(rgb_float, p), p), p)


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


def photometric_ops(cfg: AugmentConfig | None) -> tuple[bool, bool]:
    """(blur, hed): which optional image ops a pipeline built for ``cfg`` needs at all."""
    if cfg is None:
        return False, False
    return cfg.blur_prob > 0, cfg.hed_jitter > 0 or cfg.hed_shift > 0 or cfg.od_scale > 0 or cfg.stain_hue > 0


def photometric_inputs(p: AugParams, ops: tuple[bool, bool]) -> list[np.ndarray]:
    """Per-sample arrays that the DALI pipeline feeds to its blur and HED ops: the 2-D blur
    kernel (an impulse when this sample is not blurred) and the HED map as DALI's
    ``coord_transform`` MT = [A^T | t] (it maps column vectors)."""
    out = []
    if ops[0]:
        out.append(blur_kernel_2d(p))
    if ops[1]:
        a, t = hed_affine(p)
        out.append(np.ascontiguousarray(np.concatenate([a.T, t[:, None]], axis=1), dtype=np.float32))
    return out
