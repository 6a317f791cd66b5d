"""Augmentation of a uint8 patch straight to the normalised (3, H, W) float32 model input
through a per-sample lookup table: the same numbers as

    normalise(colour(geometric(rgb, p).astype(np.float32), p), mean, std)

bit for bit, at about half the cost. ``colour`` and ``normalise`` act on each channel of
each pixel independently, and a uint8 channel has only 256 values, so they are evaluated
once per value (by calling those very functions on a 256-entry ramp) and then gathered:
one float32 write per pixel instead of four passes over float32 images. A colour transform
that mixes channels cannot be tabulated this way and must use the plain functions.
"""

from __future__ import annotations

import numpy as np

from mlps_dist.data.augment import AugParams, colour, geometric, normalise

_RAMP = np.repeat(np.arange(256, dtype=np.float32)[:, None, None], 3, axis=2)  # (256, 1, 3)


def channel_tables(p: AugParams, mean: list[float], std: list[float]) -> np.ndarray:
    """(3, 256) float32: the model input value of every uint8 level, per channel."""
    return normalise(colour(_RAMP, p), mean, std)[:, :, 0]


def model_input_chw(rgb: np.ndarray, p: AugParams, mean: list[float], std: list[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> geometry of ``p``, colour jitter, normalisation -> (3, H', W') float32."""
    tables = channel_tables(p, mean, std)
    planes = np.ascontiguousarray(geometric(rgb, p).transpose(2, 0, 1))  # uint8 copy: cheap, and take() runs contiguous
    out = np.empty(planes.shape, dtype=np.float32)
    for c in range(3):
        np.take(tables[c], planes[c], out=out[c])
    return out
