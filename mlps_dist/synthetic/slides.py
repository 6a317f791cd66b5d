"""Synthetic whole slides: pyramidal tiled TIFFs with MPP tags, QuPath GeoJSON and the truth.

    write_synthetic_slide("slides/s0.tiff", "annotations/s0.geojson", width=3072, height=2048, seed=0)

A slide is a blob of tissue on white glass, cut into Voronoi cells; each cell is one of the
four LUAD tissues (TE, NEC, LYM, TAS) rendered with the textures and stain model of the
synthetic patch generator (mlps_dist.synthetic.patches). The cells are exported as GeoJSON
features named as a pathologist would in QuPath ("Tumor", "Necrosis", "Immune cells",
"Stroma"), so the truth of every pixel is the polygon covering it (``truth_map``).

Level 0 is written at ``mpp`` um/px (default 1.0, the scale the textures were drawn for),
followed by 2x reduced levels down to ~256 px, in 256 px JPEG tiles, with the resolution
stored in centimetres so OpenSlide reports ``openslide.mpp-x`` (``mpp=None`` writes none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mlps_dist.core.fileio import atomic_write_json
from mlps_dist.slides.tiff import write_pyramid_tiff
from mlps_dist.synthetic.patches import CLASSES, PALETTE, WHITE, random_stain
from mlps_dist.synthetic.tissue import TISSUE_TEXTURES

QUPATH_NAMES = ("Tumor", "Necrosis", "Immune cells", "Stroma")
CLASS_MAP = ",".join(f"{n}={c}" for n, c in zip(QUPATH_NAMES, CLASSES))
RENDER_BLOCK = 512


def slide_regions(
    width: int, height: int, seed: int, cell_px: int = 600, extent: float = 0.42
) -> list[tuple[int, object]]:
    """[(class index, shapely Polygon)]: Voronoi cells of the tissue blob, disjoint. ``extent``:
    the blob's half-axes as a share of the slide's sides (0.42: about half the slide is tissue)."""
    from shapely.geometry import MultiPoint, Polygon
    from shapely.ops import voronoi_diagram

    rng = np.random.default_rng([seed, 7])
    # Tissue outline: an ellipse with a wobbly radius, inset from the slide border (glass).
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    wobble = 1 + sum(rng.uniform(0, 0.06) * np.sin(k * angles + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    cx, cy = width / 2, height / 2
    outline = Polygon(
        np.stack(
            [cx + extent * width * wobble * np.cos(angles), cy + extent * 0.95 * height * wobble * np.sin(angles)], 1
        )
    ).buffer(0)
    count = max(4, int(outline.area / cell_px**2))
    points = MultiPoint(np.stack([rng.uniform(0, width, count), rng.uniform(0, height, count)], 1))
    cells = voronoi_diagram(points, envelope=outline.envelope.buffer(10))
    regions = []
    for number, cell in enumerate(sorted(cells.geoms, key=lambda g: (g.centroid.y, g.centroid.x))):
        part = cell.intersection(outline)
        if part.is_empty or part.area < 1:
            continue
        cls = number % len(CLASSES) if number < len(CLASSES) else int(rng.integers(0, len(CLASSES)))
        for poly in [part] if part.geom_type == "Polygon" else list(part.geoms):
            if poly.geom_type == "Polygon":
                regions.append((cls, poly))
    return regions


def geojson(regions) -> dict:
    from shapely.geometry import mapping

    features = [
        {
            "type": "Feature",
            "id": f"region-{i}",
            "geometry": mapping(poly),
            "properties": {
                "objectType": "annotation",
                "classification": {"name": QUPATH_NAMES[cls], "color": list(PALETTE[cls])},
            },
        }
        for i, (cls, poly) in enumerate(regions)
    ]
    return {"type": "FeatureCollection", "features": features}


def truth_map(
    regions, x0: float, y0: float, size0: float, out: int, out_h: int | None = None, size0_h: float | None = None
) -> np.ndarray:
    """Class index per pixel (WHITE = glass) of a level-0 box resampled to (out_h, out)."""
    out_h = out if out_h is None else out_h
    size0_h = size0 if size0_h is None else size0_h
    sx, sy = out / size0, out_h / size0_h
    image = Image.new("L", (out, out_h), WHITE)
    draw = ImageDraw.Draw(image)
    for cls, poly in regions:
        draw.polygon([((x - x0) * sx - 0.5, (y - y0) * sy - 0.5) for x, y in poly.exterior.coords], fill=int(cls))
    return np.asarray(image)


def render_flat(regions, width: int, height: int) -> np.ndarray:
    """Each region in its class's palette colour on white: a slide whose truth a per-pixel
    colour rule recovers exactly (tests of the stitching geometry)."""
    return np.asarray(PALETTE, np.uint8)[truth_map(regions, 0, 0, width, width, height, height)]


def render_slide(regions, width: int, height: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 H&E rendering of the regions, block by block."""
    rng = np.random.default_rng([seed, 11])
    stain = random_stain(rng)
    stain.light = np.array([240.0, 238.0, 242.0])
    rgb = np.empty((height, width, 3), np.uint8)
    for by in range(0, height, RENDER_BLOCK):
        for bx in range(0, width, RENDER_BLOCK):
            mask = truth_map(regions, bx, by, RENDER_BLOCK, RENDER_BLOCK)
            hema = np.zeros(mask.shape, np.float32)
            eosin = np.zeros(mask.shape, np.float32)
            for index in np.unique(mask):
                h, e = TISSUE_TEXTURES[index](rng, RENDER_BLOCK)
                hema[mask == index], eosin[mask == index] = h[mask == index], e[mask == index]
            od = hema[..., None] * (stain.h_scale * stain.h_vec).astype(np.float32) + eosin[..., None] * (
                stain.e_scale * stain.e_vec
            ).astype(np.float32)
            block = np.clip(stain.light.astype(np.float32) * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
            block = np.asarray(Image.fromarray(block).filter(ImageFilter.GaussianBlur(0.6)))
            bh, bw = min(RENDER_BLOCK, height - by), min(RENDER_BLOCK, width - bx)
            rgb[by : by + bh, bx : bx + bw] = block[:bh, :bw]
    return rgb


def write_synthetic_slide(
    slide_path: str | Path,
    annotation_path: str | Path | None,
    width: int,
    height: int,
    seed: int,
    mpp: float | None = 1.0,
    cell_px: int = 600,
    flat: bool = False,
    extent: float = 0.42,
) -> list:
    """Write one slide (and its GeoJSON); returns the regions (the truth)."""
    regions = slide_regions(width, height, seed, cell_px, extent)
    rgb = render_flat(regions, width, height) if flat else render_slide(regions, width, height, seed)
    write_pyramid_tiff(slide_path, rgb, mpp, compression="zlib" if flat else "jpeg")
    if annotation_path is not None:
        atomic_write_json(annotation_path, geojson(regions), indent=None)
    return regions


def write_synthetic_slides(
    out_dir: str | Path,
    count: int,
    width: int = 3072,
    height: int = 2048,
    seed: int = 0,
    mpp: float | None = 1.0,
    cell_px: int = 600,
) -> dict:
    """``count`` slides under OUT/slides/ and their GeoJSON under OUT/annotations/."""
    out = Path(out_dir)
    names = []
    for i in range(count):
        name = f"synthslide{i:02d}"
        slide = out / "slides" / f"{name}.tiff"
        if not slide.is_file() or not (out / "annotations" / f"{name}.geojson").is_file():
            write_synthetic_slide(slide, out / "annotations" / f"{name}.geojson", width, height, seed + i, mpp, cell_px)
        names.append(name)
    summary = {
        "slides": names,
        "width": width,
        "height": height,
        "mpp": mpp,
        "seed": seed,
        "classes": list(CLASSES),
        "class_map": CLASS_MAP,
    }
    atomic_write_json(out / "synthetic_slides.json", summary)
    return summary
