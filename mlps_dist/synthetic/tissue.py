"""Stain-concentration textures of the four LUAD tissues, for the synthetic H&E generator.

Every texture is a pair of concentration maps ``(hematoxylin, eosin)`` in optical-density
units at the reference stain vectors; ``synthetic.py`` mixes them per region and turns them
into RGB with Beer-Lambert. Pixel scales mimic 10x magnification (about 1 um per pixel):
lymphocyte nuclei ~6 px across, tumour nuclei 8-14 px, spindle nuclei ~3 x 15 px.

Every texture takes ``scale`` and ``density``: multipliers of nuclear size and nuclei per area.

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
    field = field[start : start + size, start : start + size]
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def fine_noise(rng: np.random.Generator, size: int, grain: int = 2) -> np.ndarray:
    """Grainy noise (chromatin, debris) with a correlation length of about `grain` pixels."""
    low = rng.standard_normal((size // grain + 2, size // grain + 2)).astype(np.float32)
    up = np.asarray(Image.fromarray(low).resize((size + 2 * grain, size + 2 * grain), Image.BILINEAR))
    return up[grain : grain + size, grain : grain + size]


def nuclei(
    rng: np.random.Generator,
    size: int,
    *,
    cell: int,
    fill: float,
    radius: tuple[float, float],
    elongation: tuple[float, float],
    darkness: tuple[float, float],
    vesicular: float = 0.0,
    angle: float | None = None,
    angle_jitter: float = 0.3,
    warp: float = 0.0,
    scale: float = 1.0,
    density: float = 1.0,
) -> np.ndarray:
    """Hematoxylin map of nuclei on a jittered grid: one candidate nucleus per `cell` x `cell` square.

    radius: (min, max) semi-major axis in pixels; elongation: (min, max) ratio major/minor;
    darkness: peak optical density; vesicular: fraction of nuclei with pale centre, dark rim and
    a nucleolus (tumour cells); angle: common orientation (stroma), else random per nucleus;
    warp: pixels of smooth domain distortion that makes the outlines irregular; scale
    multiplies the nuclei's size (and the grid with it), density the nuclei per area: the grid
    shrinks by sqrt(density) while the nuclei still fit, the rest goes into `fill`.

    Centres sit in the middle 60% of their cell, so with radius + warp < 0.7 * cell a pixel can
    only be reached by its own cell's nucleus and the three neighbours on its side of the cell:
    4 candidates per pixel instead of 9.
    """
    radius = (radius[0] * scale, radius[1] * scale)
    wanted = cell * scale / np.sqrt(density)  # grid that gives `density` x the nuclei at `fill`
    smallest = (radius[1] + warp) / 0.7 + 0.01  # nuclei must not reach past the neighbours
    half = max(1, int(np.ceil(max(wanted, smallest) / 2)))
    cell = 2 * half
    fill = min(1.0, fill * (cell / wanted) ** 2)
    assert radius[1] + warp < 0.7 * cell, "nucleus could reach past the neighbouring cells"
    grid = -(-size // cell)  # cells per side covering the patch
    n = grid + 2  # one cell of margin so nuclei straddle the patch border
    jitter_y = rng.uniform(0.2, 0.8, (n, n)).astype(np.float32)
    jitter_x = rng.uniform(0.2, 0.8, (n, n)).astype(np.float32)
    present = rng.random((n, n)) < fill
    major = rng.uniform(*radius, (n, n)).astype(np.float32)
    minor = major / rng.uniform(*elongation, (n, n)).astype(np.float32)
    theta = rng.uniform(0, np.pi, (n, n)) if angle is None else angle + rng.normal(0, angle_jitter, (n, n))
    cos_t, sin_t = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    peak = (rng.uniform(*darkness, (n, n)) * present).astype(np.float32)
    is_vesicular = rng.random((n, n)) < vesicular
    params = [jitter_y, jitter_x, cos_t, sin_t, 1.0 / major, 1.0 / minor, minor, peak, is_vesicular]

    # Pixels laid out as (cell row, half, row in half, cell column, half, column in half):
    # a plain reshape of the (side, side) image.
    side = grid * cell
    shape6 = (grid, 2, half, grid, 2, half)
    local = np.arange(cell, dtype=np.float32).reshape(2, half) + 0.5
    ly = local[None, :, :, None, None, None]
    lx = local[None, None, None, None, :, :]
    if warp > 0:
        ly = ly + (smooth_field(rng, side, side / (cell * 0.8)) * warp).reshape(shape6)
        lx = lx + (smooth_field(rng, side, side / (cell * 0.8)) * warp).reshape(shape6)
    toward = np.array([-1, 1], np.float32)  # the neighbour on the side of each half

    def neighbour(a, sy, sx):
        # a[i + 1 + dy, j + 1 + dx] with dy = sy * (-1 | +1 by half), shaped like params of shape6.
        rows = a[1 : grid + 1][:, None] if not sy else np.stack([a[0:grid], a[2 : grid + 2]], axis=1)
        rows = np.broadcast_to(rows, (grid, 2, n))
        cols = (
            rows[:, :, 1 : grid + 1][..., None]
            if not sx
            else np.stack([rows[:, :, 0:grid], rows[:, :, 2 : grid + 2]], -1)
        )
        cols = np.broadcast_to(cols, (grid, 2, grid, 2))
        return cols[:, :, None, :, :, None]

    out = np.zeros(shape6, np.float32)
    for sy in (0, 1):
        for sx in (0, 1):
            jy, jx, c, s, inv_major, inv_minor, minor_px, top, ves = (neighbour(a, sy, sx) for a in params)
            dy = (toward * sy)[None, :, None, None, None, None]
            dx = (toward * sx)[None, None, None, None, :, None]
            u = lx - (dx + jx) * cell
            v = ly - (dy + jy) * cell
            along = (u * c + v * s) * inv_major
            across = (v * c - u * s) * inv_minor
            dist = np.sqrt(along * along + across * across)
            body = np.clip((1.0 - dist) * minor_px + 0.5, 0.0, 1.0)  # ~1 px soft edge
            if vesicular > 0:
                # Vesicular nucleus: chromatin pushed to the rim, pale centre, dark nucleolus.
                rim = 0.4 + 0.6 * np.minimum(dist, 1.0) ** 2 + 1.1 * np.clip((0.28 - dist) * 6.0, 0.0, 1.0)
                body = body * np.where(ves, rim, 1.0)
            np.maximum(out, body * top, out=out)
    return out.reshape(side, side)[:size, :size]


def tumour_epithelium(
    rng: np.random.Generator, size: int, scale: float = 1.0, density: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Packed large irregular dark nuclei, some vesicular with nucleoli, eosinophilic cytoplasm."""
    h = nuclei(
        rng,
        size,
        cell=rng.choice([10, 12]),
        fill=0.95,
        radius=(3.8, 5.8),
        elongation=(1.1, 1.8),
        darkness=(0.7, 1.3),
        vesicular=rng.uniform(0.2, 0.6),
        warp=1.0,
        scale=scale,
        density=density,
    )
    h = h * (0.8 + 0.25 * fine_noise(rng, size, 1))
    mottle = smooth_field(rng, size, size / 24)
    e = 0.42 + 0.07 * mottle + 0.04 * fine_noise(rng, size, 2)
    return h + 0.10, e  # faint amphophilic cytoplasm


def necrosis(
    rng: np.random.Generator, size: int, scale: float = 1.0, density: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pale pink amorphous debris with scattered nuclear dust (karyorrhexis)."""
    dust = nuclei(
        rng,
        size,
        cell=6,
        fill=rng.uniform(0.12, 0.3),
        radius=(0.7, 1.8),
        elongation=(1.0, 1.6),
        darkness=(0.6, 1.2),
        scale=scale,
        density=density,
    )
    ghosts = nuclei(
        rng,
        size,
        cell=12,
        fill=0.3,
        radius=(3.0, 5.0),
        elongation=(1.0, 1.5),
        darkness=(0.08, 0.18),
        warp=1.0,
        scale=scale,
        density=density,
    )  # faded outlines of dead cells
    smudge = smooth_field(rng, size, size / 40)
    e = 0.40 + 0.05 * smudge + 0.02 * fine_noise(rng, size, 3)
    return dust + ghosts + 0.06 + 0.03 * smudge, e


def lymphocytes(
    rng: np.random.Generator, size: int, scale: float = 1.0, density: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Dense small round dark nuclei with little cytoplasm."""
    h = nuclei(
        rng,
        size,
        cell=6,
        fill=rng.uniform(0.7, 0.9),
        radius=(2.3, 3.2),
        elongation=(1.0, 1.25),
        darkness=(1.1, 1.6),
        warp=0.4,
        scale=scale,
        density=density,
    )
    h = h * (0.9 + 0.1 * fine_noise(rng, size, 1))
    e = 0.22 + 0.04 * smooth_field(rng, size, size / 30)
    return h + 0.07, e


def stroma(
    rng: np.random.Generator, size: int, scale: float = 1.0, density: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Wavy pink collagen fibres (oriented streaks) with sparse elongated spindle nuclei."""
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    # Waviness: the fibres' across-coordinate bends with a smooth field.
    bend = smooth_field(rng, size, size / 50) * rng.uniform(4, 10)
    period = rng.uniform(3.5, 6.5)
    phase_noise = smooth_field(rng, size, size / 10) * 2.5
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (across + bend) / period + phase_noise)
    breaks = np.clip(0.45 + 0.7 * fine_noise(rng, size, 4), 0, 1)  # fibres fray and end
    e = 0.30 + 0.5 * stripes**2 * breaks + 0.05 * smooth_field(rng, size, size / 30)
    h = nuclei(
        rng,
        size,
        cell=16,
        fill=rng.uniform(0.2, 0.45),
        radius=(5.0, 9.0),
        elongation=(3.0, 5.0),
        darkness=(0.7, 1.2),
        angle=float(angle),
        angle_jitter=0.15,
        warp=0.8,
        scale=scale,
        density=density,
    )
    return h + 0.04, e


def white(
    rng: np.random.Generator, size: int, scale: float = 1.0, density: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Lumen, fat or glass: almost no stain, a faint pink haze."""
    e = 0.03 + 0.015 * smooth_field(rng, size, size / 40)
    return np.full((size, size), 0.01, np.float32), np.clip(e, 0, None)


TISSUE_TEXTURES = (tumour_epithelium, necrosis, lymphocytes, stroma, white)
