"""Stain-concentration textures of the four LUAD tissues, for the synthetic H&E generator.

Every texture is a pair of concentration maps ``(hematoxylin, eosin)`` in optical-density
units at the reference stain vectors; ``synthetic.py`` mixes them per region and turns them
into RGB with Beer-Lambert. Pixel scales mimic 10x magnification (about 1 um per pixel):
lymphocyte nuclei ~6 px across, tumour nuclei 8-14 px, spindle nuclei ~3 x 15 px.

Everything is vectorised numpy; the only per-pixel loop is over the 3x3 neighbouring cells
of a jittered grid of nuclei (see ``nuclei``), so a 224 px patch takes a few milliseconds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def smooth_field(rng: np.random.Generator, size: int, blobs: float) -> np.ndarray:
    """Smooth random field (size x size, float32, ~zero mean, unit std) with `blobs` bumps per side.

    Low-resolution white noise upsampled bicubically: a cheap stand-in for Gaussian-filtered
    noise (no scipy in the dependencies).
    """
    cells = max(2, int(round(blobs)) + 2)
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    # Oversample then crop the centre so the bicubic edge clamping does not show at the border.
    big = int(size * cells / (cells - 1.5)) + 2
    field = np.asarray(Image.fromarray(low).resize((big, big), Image.BICUBIC))
    start = (big - size) // 2
    field = field[start:start + size, start:start + size]
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def fine_noise(rng: np.random.Generator, size: int, grain: int = 2) -> np.ndarray:
    """Grainy noise (chromatin, debris) with a correlation length of about `grain` pixels."""
    low = rng.standard_normal((size // grain + 2, size // grain + 2)).astype(np.float32)
    up = np.asarray(Image.fromarray(low).resize((size + 2 * grain, size + 2 * grain), Image.BILINEAR))
    return up[grain:grain + size, grain:grain + size]


def nuclei(rng: np.random.Generator, size: int, *, cell: float, fill: float,
           radius: tuple[float, float], elongation: tuple[float, float], darkness: tuple[float, float],
           vesicular: float = 0.0, angle: float | None = None, angle_jitter: float = 0.3,
           warp: float = 0.0) -> np.ndarray:
    """Hematoxylin map of nuclei on a jittered grid: one candidate nucleus per `cell` x `cell` square.

    radius: (min, max) semi-major axis in pixels; elongation: (min, max) ratio major/minor;
    darkness: peak optical density; vesicular: fraction of nuclei with pale centre, dark rim and
    a nucleolus (tumour cells); angle: common orientation (stroma), else random per nucleus;
    warp: pixels of smooth domain distortion that makes the outlines irregular.
    """
    cell = int(cell)
    grid = -(-size // cell)  # cells per side covering the patch
    n = grid + 2  # one cell of margin so nuclei straddle the patch border
    jitter_y = rng.uniform(0.2, 0.8, (n, n)).astype(np.float32)
    jitter_x = rng.uniform(0.2, 0.8, (n, n)).astype(np.float32)
    present = rng.random((n, n)) < fill
    major = rng.uniform(*radius, (n, n)).astype(np.float32)
    minor = major / rng.uniform(*elongation, (n, n)).astype(np.float32)
    if angle is None:
        theta = rng.uniform(0, np.pi, (n, n))
    else:
        theta = angle + rng.normal(0, angle_jitter, (n, n))
    cos_t, sin_t = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    peak = (rng.uniform(*darkness, (n, n)) * present).astype(np.float32)
    is_vesicular = rng.random((n, n)) < vesicular

    # Pixel coordinates inside their own cell, shaped (grid, grid, cell, cell).
    local = np.arange(cell, dtype=np.float32) + 0.5
    ly = np.broadcast_to(local[None, None, :, None], (grid, grid, cell, cell))
    lx = np.broadcast_to(local[None, None, None, :], (grid, grid, cell, cell))
    if warp > 0:
        side = grid * cell
        wy = smooth_field(rng, side, side / (cell * 0.8)) * warp
        wx = smooth_field(rng, side, side / (cell * 0.8)) * warp
        ly = ly + wy.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)
        lx = lx + wx.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)

    out = np.zeros((grid, grid, cell, cell), np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sl = (slice(1 + dy, 1 + dy + grid), slice(1 + dx, 1 + dx + grid))

            def take(a):
                return a[sl][:, :, None, None]

            u = lx - (dx + take(jitter_x)) * cell
            v = ly - (dy + take(jitter_y)) * cell
            c, s = take(cos_t), take(sin_t)
            along = (u * c + v * s) / take(major)
            across = (v * c - u * s) / take(minor)
            dist = np.sqrt(along * along + across * across)
            # ~1 px soft edge: sharpness scales with the minor radius.
            body = np.clip((1.0 - dist) * take(minor) + 0.5, 0.0, 1.0)
            ves = take(is_vesicular)
            # Vesicular nucleus: chromatin pushed to the rim, pale centre, dark nucleolus.
            profile = np.where(ves, 0.4 + 0.6 * np.clip(dist, 0, 1) ** 2
                               + 1.1 * np.clip((0.28 - dist) * 6.0, 0.0, 1.0), 1.0)
            np.maximum(out, body * profile * take(peak), out=out)
    return out.transpose(0, 2, 1, 3).reshape(grid * cell, grid * cell)[:size, :size]


def tumour_epithelium(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed large irregular dark nuclei, some vesicular with nucleoli, eosinophilic cytoplasm."""
    h = nuclei(rng, size, cell=rng.uniform(10, 13), fill=0.92, radius=(4.0, 6.5), elongation=(1.1, 1.8),
               darkness=(0.7, 1.3), vesicular=rng.uniform(0.2, 0.6), warp=1.3)
    h = h * (0.8 + 0.25 * fine_noise(rng, size, 1))
    mottle = smooth_field(rng, size, size / 24)
    e = 0.42 + 0.07 * mottle + 0.04 * fine_noise(rng, size, 2)
    return h + 0.10, e  # faint amphophilic cytoplasm


def necrosis(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pale pink amorphous debris with scattered nuclear dust (karyorrhexis)."""
    dust = nuclei(rng, size, cell=6, fill=rng.uniform(0.12, 0.3), radius=(0.7, 1.8), elongation=(1.0, 1.6),
                  darkness=(0.6, 1.2))
    ghosts = nuclei(rng, size, cell=11, fill=0.3, radius=(3.0, 5.0), elongation=(1.0, 1.5),
                    darkness=(0.08, 0.18), warp=1.0)  # faded outlines of dead cells
    smudge = smooth_field(rng, size, size / 40)
    e = 0.30 + 0.05 * smudge + 0.02 * fine_noise(rng, size, 3)
    return dust + ghosts + 0.06 + 0.03 * smudge, e


def lymphocytes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense small round dark nuclei with little cytoplasm."""
    h = nuclei(rng, size, cell=rng.uniform(6, 7.5), fill=0.85, radius=(2.3, 3.2), elongation=(1.0, 1.25),
               darkness=(1.1, 1.6), warp=0.4)
    h = h * (0.9 + 0.1 * fine_noise(rng, size, 1))
    e = 0.16 + 0.04 * smooth_field(rng, size, size / 30)
    return h + 0.07, e


def stroma(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Wavy pink collagen fibres (oriented streaks) with sparse elongated spindle nuclei."""
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    # Waviness: the fibres' across-coordinate bends with a smooth field.
    bend = smooth_field(rng, size, size / 50) * rng.uniform(4, 10)
    period = rng.uniform(4.0, 7.0)
    phase_noise = smooth_field(rng, size, size / 12) * 1.5
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (across + bend) / period + phase_noise)
    breaks = np.clip(0.6 + 0.5 * fine_noise(rng, size, 3), 0, 1)
    e = 0.22 + 0.45 * stripes ** 2 * breaks + 0.04 * smooth_field(rng, size, size / 30)
    h = nuclei(rng, size, cell=16, fill=rng.uniform(0.2, 0.45), radius=(5.0, 9.0), elongation=(3.0, 5.0),
               darkness=(0.7, 1.2), angle=float(angle), angle_jitter=0.15, warp=0.8)
    return h + 0.04, e


def white(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lumen, fat or glass: almost no stain, a faint pink haze."""
    e = 0.03 + 0.015 * smooth_field(rng, size, size / 40)
    return np.full((size, size), 0.01, np.float32), np.clip(e, 0, None)


TISSUE_TEXTURES = (tumour_epithelium, necrosis, lymphocytes, stroma, white)
