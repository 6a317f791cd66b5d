"""Colours and overlays: class-index maps drawn in the dataset palette.

Used by stage-3 validation images, `infer`, the visualiser and the slide tools. Only numpy
(no torch needed to draw), so deployment code can use it too. They are saved as PNG by core/png.py.
"""

from __future__ import annotations

import numpy as np


def palette_for(num_classes: int, info: dict | None) -> list[tuple[int, int, int]]:
    """C + 1 colours: the dataset palette (last = ignore/white) or stable generated ones."""
    if info and len(info.get("palette", [])) >= num_classes:
        colours = [tuple(int(v) for v in c) for c in info["palette"][: num_classes + 1]]
    else:
        rng = np.random.default_rng(num_classes)
        colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]
    return colours + [(255, 255, 255)] * (num_classes + 1 - len(colours))


def colourise(indices: np.ndarray, palette) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; indices beyond the palette drawn black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.asarray(indices).astype(np.uint8)]


def blend(rgb: np.ndarray, indices: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    return (rgb * (1 - alpha) + colourise(indices, palette) * alpha).round().astype(np.uint8)


def _numpy(value) -> np.ndarray:
    """Arrays and torch tensors (on any device) alike, without importing torch here."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def overlay_row(rgb, masks, palette) -> np.ndarray:
    """The image followed by one overlay per mask, side by side (H, W*(1+len(masks)), 3).
    Accepts (3,H,W) or (H,W,3) images and torch tensors or arrays."""
    rgb = _numpy(rgb)
    if rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = rgb.transpose(1, 2, 0)
    panels = [rgb.astype(np.uint8)]
    panels += [blend(rgb, _numpy(mask), palette) for mask in masks]
    return np.concatenate(panels, axis=1)
