"""The files segment_slides writes for one slide (into its temporary folder, renamed into
place by the caller once all are written).

    classes.png        uint8 class index per map pixel (palette PNG), ignore off tissue
    classes.tiff       the same indices as a tiled pyramidal palette TIFF with resolution tags
    regions.geojson    one QuPath annotation per connected region of each class (slides/regions.py)
    probabilities.tiff per-class uint8 probability planes, OME-TIFF (only with --probabilities)
    overlay.png        slide | slide with classes, legend and scale bar (slides/overlay.py)
    tissue.png         the tissue mask at the map's resolution
    summary.json       written by the caller, with what ``write_slide_outputs`` returns

Torch-free (the --model path writes them too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlps_dist.core import png
from mlps_dist.core.fileio import atomic_write_bytes
from mlps_dist.slides.overlay import render_overlay
from mlps_dist.slides.regions import region_features
from mlps_dist.slides.tiff import write_index_tiff, write_probability_tiff


def probability_planes(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities in [0, 1] -> uint8 x 255, rounded."""
    return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)


def write_slide_outputs(
    tmp: Path,
    name: str,
    classes: np.ndarray,
    probs: np.ndarray,
    geo,
    names: list[str],
    palette,
    *,
    view: np.ndarray,
    view_mpp: float,
    areas_mm2: dict,
    simplify: float,
    min_region_um2: float,
    with_probabilities: bool,
) -> dict:
    """Write the slide's map files into ``tmp``; returns the summary.json entries they add."""
    ignore = len(names)
    atomic_write_bytes(tmp / "classes.png", png.encode_indices(classes, palette, full_palette=True))
    write_index_tiff(tmp / "classes.tiff", classes, palette, geo.map_mpp)
    regions = region_features(
        classes,
        probs,
        names,
        palette,
        slide=name,
        px0=geo.px0,
        map_mpp=geo.map_mpp,
        simplify=simplify,
        min_area_um2=min_region_um2,
        bounds=(geo.width, geo.height),
        ignore=ignore,
    )
    atomic_write_bytes(tmp / "regions.geojson", regions.geojson_bytes())
    if with_probabilities:
        write_probability_tiff(tmp / "probabilities.tiff", probability_planes(probs), names, geo.map_mpp)
    title = f"{name}: {geo.width} x {geo.height} px at {geo.mpp:.4g} um/px, classes at {geo.map_mpp:g} um/px"
    overlay = render_overlay(
        view, classes, palette, names, ignore, view_mpp=view_mpp, map_mpp=geo.map_mpp, areas_mm2=areas_mm2, title=title
    )
    atomic_write_bytes(tmp / "overlay.png", png.encode(overlay))
    return {**regions.summary(), "overlay": {"mpp": view_mpp, "size": [overlay.shape[1], overlay.shape[0]]}}
