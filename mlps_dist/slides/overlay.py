"""overlay.png of segment_slides: the slide beside the slide with its classes, a legend
and a scale bar, large enough to read.

    mpp = view_mpp(width, height, slide_mpp, map_mpp)   # resolution of the two panels
    rgb = render_overlay(view, classes, palette, names, ignore, view_mpp=mpp, map_mpp=8.0,
                         slide_mpp=0.25, areas_mm2={...})

The panels are the slide read at ``view_mpp``: its longest side VIEW_SIDE (2048) pixels
where the slide has that many level-0 pixels, never coarser than the class map (a map
larger than that is shown at its own size). The class map is enlarged by picking, for
each panel pixel, the map pixel under its centre (nearest: classes are never blended with
each other), and blended into the right panel where there is tissue. Below: one legend
entry per class (colour, name, area in mm2) and a scale bar of a round length. Text is
Pillow's built-in font (ASCII: it has no micro sign), so the same inputs give the same bytes on every machine with the
same Pillow. Numpy and Pillow only (the torch-free path draws it too).
"""

from __future__ import annotations

import math

import numpy as np

from mlps_dist.core.draw import blend

VIEW_SIDE = 2048
ALPHA = 0.45  # share of the class colour in the blended panel


def view_mpp(width: int, height: int, slide_mpp: float, map_mpp: float) -> float:
    longest = max(width, height)
    return min(map_mpp, slide_mpp * longest / min(VIEW_SIDE, longest))


def upsample_map(classes: np.ndarray, shape: tuple[int, int], view_mpp: float, map_mpp: float) -> np.ndarray:
    """The map pixel under the centre of each pixel of a (H, W) panel at ``view_mpp``."""
    ratio = view_mpp / map_mpp
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * ratio).astype(np.int64), classes.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * ratio).astype(np.int64), classes.shape[1] - 1)
    return classes[rows[:, None], cols[None, :]]


def scale_bar_um(panel_width: int, mpp: float) -> float:
    """A round length (1, 2 or 5 x 10^k um) of at most a fifth of the panel."""
    most = panel_width * mpp / 5
    power = 10 ** math.floor(math.log10(most))
    return max(s * power for s in (1, 2, 5) if s * power <= most)


def length_text(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} um"


def font_size(h: int, w: int) -> int:
    return max(14, max(h, w) // 64)


def panel_origins(h: int, w: int, title: bool = True) -> tuple[tuple[int, int], tuple[int, int]]:
    """(x, y) of the slide panel and of the classes panel in the overlay of an (h, w) view."""
    size = font_size(h, w)
    top = size + (int(size * 1.6) if title else 0)
    return (size, top), (2 * size + w, top)


def render_overlay(
    view: np.ndarray,
    classes: np.ndarray,
    palette,
    names: list[str],
    ignore: int,
    *,
    view_mpp: float,
    map_mpp: float,
    areas_mm2: dict | None = None,
    title: str = "",
) -> np.ndarray:
    """(H', W', 3) uint8: slide | slide with classes, legend and scale bar below."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = view.shape[:2]
    up = upsample_map(classes, (h, w), view_mpp, map_mpp)
    tinted = np.where((up != ignore)[..., None], blend(view, up, palette, ALPHA), view)
    size = font_size(h, w)
    font = ImageFont.load_default(size=size)
    margin, gap = size, size // 2
    items = [
        (palette[c], f"{n}" + (f"  {areas_mm2[n]:.3g} mm2" if areas_mm2 and n in areas_mm2 else ""))
        for c, n in enumerate(names)
    ]
    bar_um = scale_bar_um(w, view_mpp)
    bar_px = max(1, round(bar_um / view_mpp))
    width = 2 * w + 3 * margin
    # flow the legend entries into rows; the scale bar takes the last entry's place
    entries = [(colour, text, size + gap + font.getlength(text)) for colour, text in items]
    entries.append((None, length_text(bar_um), bar_px + gap + font.getlength(length_text(bar_um))))
    rows, row, used = [], [], 0.0
    for entry in entries:
        if row and used + entry[2] > width - 2 * margin:
            rows.append(row)
            row, used = [], 0.0
        row.append(entry)
        used += entry[2] + 2 * size
    rows.append(row)
    line = int(size * 1.6)
    title_h = line if title else 0
    canvas = Image.new("RGB", (width, h + 2 * margin + title_h + len(rows) * line + margin // 2), "white")
    left, right = panel_origins(h, w, bool(title))
    canvas.paste(Image.fromarray(view), left)
    canvas.paste(Image.fromarray(tinted), right)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, margin // 2), title, fill=(0, 0, 0), font=font)
    y = margin + title_h + h + margin
    for row in rows:
        x = margin
        for colour, text, length in row:
            if colour is None:  # the scale bar: a black bar with its length beside it
                draw.rectangle([x, y + size // 3, x + bar_px - 1, y + size // 3 + max(2, size // 4)], fill=(0, 0, 0))
                draw.text((x + bar_px + gap, y), text, fill=(0, 0, 0), font=font)
            else:
                draw.rectangle(
                    [x, y, x + size - 1, y + size - 1], fill=tuple(int(v) for v in colour), outline=(0, 0, 0)
                )
                draw.text((x + size + gap, y), text, fill=(0, 0, 0), font=font)
            x += int(length) + 2 * size
        y += line
    return np.asarray(canvas)
