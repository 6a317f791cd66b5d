"""Open a whole-slide image with OpenSlide and read regions at a target resolution.

    slide = Slide("a.svs", mpp=None)           # InputError when the slide has no MPP and none is given
    rgb = slide.read(x0, y0, size0, out)       # level-0 square (x0, y0, size0) -> out x out RGB uint8
    small = slide.read_scaled(8.0)             # the whole slide at 8 um/px, read in bounded blocks

Regions are read from the best pyramid level for the wanted downsample (the finest level
not finer than needed, so the read is never more than about 2x the output in each
direction) and resampled with an antialiasing filter (PIL's box/Lanczos reduce). Pixels
outside the scanned area (transparent in OpenSlide) are white, like empty glass.

Memory stays bounded: one read is at most ``out * level step`` pixels a side, and
``read_scaled`` assembles its output from blocks of at most BLOCK output pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core.errors import InputError

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif", ".dcm"}
BLOCK = 512  # output pixels per side of one block of read_scaled


class SlideError(InputError):
    """A slide that cannot be opened or read (truncated, unsupported, missing MPP)."""


def slide_stem(path: str | Path) -> str:
    """The slide's name: the file name without its extension (``a.ome.tiff`` -> ``a.ome``)."""
    return Path(path).stem


def list_slides(items: list[str]) -> list[Path]:
    """Slide files from files and folders (folders searched recursively), sorted, stems unique."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"--slides {item}: no such file or folder")
    if not found:
        raise InputError(f"--slides {' '.join(items)}: no slides ({', '.join(sorted(SLIDE_SUFFIXES))})")
    stems: dict[str, Path] = {}
    for path in found:
        if slide_stem(path) in stems:
            raise InputError(
                f"{path} and {stems[slide_stem(path)]} have the same name {slide_stem(path)!r}; "
                f"slides are identified by name, rename one"
            )
        stems[slide_stem(path)] = path
    return sorted(found, key=slide_stem)


def _composite_white(region: Image.Image) -> Image.Image:
    if region.mode != "RGBA":
        return region.convert("RGB")
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, region).convert("RGB")


class Slide:
    """An open slide with its level-0 size and microns per pixel."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        import openslide

        self.path = Path(path)
        self.name = slide_stem(path)
        try:
            self._osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"{path}: cannot be opened as a slide ({exc}); re-export or remove it") from exc
        self.width, self.height = self._osr.dimensions
        self.downsamples = [float(d) for d in self._osr.level_downsamples]
        self.level_sizes = [tuple(s) for s in self._osr.level_dimensions]
        self.properties = dict(self._osr.properties)
        self.mpp = float(mpp) if mpp else self.stored_mpp()
        if not self.mpp or self.mpp <= 0:
            self.close()
            raise SlideError(
                f"{path}: the slide records no microns per pixel (openslide.mpp-x); "
                f"pass --mpp with the scanner's resolution (e.g. --mpp 0.25 for 40x)"
            )

    def stored_mpp(self) -> float | None:
        values = [self.properties.get(k) for k in ("openslide.mpp-x", "openslide.mpp-y")]
        try:
            mpps = [float(v) for v in values if v not in (None, "")]
        except ValueError:
            return None
        return sum(mpps) / len(mpps) if mpps and all(m > 0 for m in mpps) else None

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed the wanted one (small tolerance)."""
        best = 0
        for level, ds in enumerate(self.downsamples):
            if ds <= downsample * 1.001:
                best = level
        return best

    def read(
        self, x0: float, y0: float, size0: float, out: int, out_h: int | None = None, size0_h: float | None = None
    ) -> np.ndarray:
        """Level-0 box (x0, y0, size0 wide, size0_h high) resampled to (out_h, out) RGB uint8."""
        out_h = out if out_h is None else out_h
        size0_h = size0 if size0_h is None else size0_h
        level = self.best_level(size0 / max(out, 1))
        ds = self.downsamples[level]
        w, h = max(1, math.ceil(size0 / ds)), max(1, math.ceil(size0_h / ds))
        try:
            region = self._osr.read_region((int(round(x0)), int(round(y0))), level, (w, h))
        except Exception as exc:  # openslide raises OpenSlideError, or OSError/ValueError from codecs
            raise SlideError(
                f"{self.path}: cannot read region at ({int(x0)}, {int(y0)}) level {level} "
                f"({exc}); the file is damaged or truncated"
            ) from exc
        rgb = _composite_white(region)
        if rgb.size != (out, out_h):
            rgb = rgb.resize((out, out_h), Image.Resampling.LANCZOS, reducing_gap=2.0)
        return np.asarray(rgb)

    def scaled_size(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide at ``mpp`` um/px."""
        scale = self.mpp / mpp
        return max(1, math.ceil(self.width * scale)), max(1, math.ceil(self.height * scale))

    def read_scaled(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` um/px as (H, W, 3) uint8, assembled from bounded blocks."""
        out_w, out_h = self.scaled_size(mpp)
        px0 = mpp / self.mpp  # level-0 pixels per output pixel
        canvas = np.empty((out_h, out_w, 3), np.uint8)
        for by in range(0, out_h, BLOCK):
            for bx in range(0, out_w, BLOCK):
                bw, bh = min(BLOCK, out_w - bx), min(BLOCK, out_h - by)
                canvas[by : by + bh, bx : bx + bw] = self.read(bx * px0, by * px0, bw * px0, bw, bh, bh * px0)
        return canvas

    def close(self) -> None:
        if getattr(self, "_osr", None) is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
