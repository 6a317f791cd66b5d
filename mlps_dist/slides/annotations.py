"""Region annotations from QuPath GeoJSON: class polygons, per-class coverage, raster masks.

A QuPath export is a FeatureCollection of Polygon/MultiPolygon features in level-0 pixel
coordinates, the class name in ``properties.classification.name``. Names map to the
dataset's classes through ``--class-map "Tumor=TE,Necrosis=NEC"`` (case-insensitive; a
name equal to a class name maps to it without being listed). A name that maps to nothing
is an error listing every name found, so a typo cannot silently drop regions.

Checked per feature, and reported in ``annotations.notes`` (tile_slides prints them):
detections and cells (``objectType`` detection/cell/tile, e.g. QuPath's cell detection) are
skipped with a count, as are geometries without area (points, lines, null); a
self-intersecting polygon is repaired with ``shapely.make_valid`` keeping all of its area
(a bow-tie keeps both lobes); a non-finite coordinate is an error naming the feature. With
the slide's size given, features wholly outside the slide are dropped and named, and a file
whose regions lie mostly outside it is refused, saying whether swapped x/y would fit.

    annotations = load_annotations(path, classes, class_map)
    annotations.coverage(x0, y0, size0)        # (C,) share of the box covered by each class
    annotations.rasterise(x0, y0, size0, out, ignore)   # (out, out) uint8 class indices
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlps_dist.errors import InputError


class AnnotationError(InputError):
    """A GeoJSON file that cannot be used (unreadable, unknown geometry, unmapped class)."""


def parse_class_map(spec: str | None, classes: list[str]) -> dict[str, int]:
    """``"Tumor=TE,Necrosis=NEC"`` -> {"tumor": 0, "necrosis": 1, "te": 0, ...} (lower-case names)."""
    index = {c.lower(): i for i, c in enumerate(classes)}
    mapping = dict(index)
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or target.strip().lower() not in index:
            raise InputError(f"--class-map entry {item!r}: expected NAME=CLASS with CLASS one of {classes}")
        mapping[name.strip().lower()] = index[target.strip().lower()]
    return mapping


def _features(data, path: Path) -> list[dict]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise AnnotationError(f"{path}: not a GeoJSON FeatureCollection (export the annotations from QuPath as GeoJSON)")


def _class_name(feature: dict) -> str:
    props = feature.get("properties") or {}
    cls = props.get("classification") or {}
    return str(cls.get("name") or props.get("name") or "(unclassified)")


class Annotations:
    """Per-class unions of the annotated regions of one slide."""

    def __init__(self, per_class: list, names: list[str], path: Path | None = None):
        from shapely import prepared

        self.per_class = per_class  # C shapely geometries (maybe empty)
        self.prepared = [prepared.prep(g) for g in per_class]
        self.names = names  # class names as found in the file
        self.path = path
        self.notes: list[str] = []  # per-feature reports (skipped, repaired), for the user

    def coverage(self, x0: float, y0: float, size0: float, size0_h: float | None = None) -> np.ndarray:
        from shapely.geometry import box

        cell = box(x0, y0, x0 + size0, y0 + (size0_h or size0))
        out = np.zeros(len(self.per_class), np.float64)
        for c, (geom, prep) in enumerate(zip(self.per_class, self.prepared)):
            if not geom.is_empty and prep.intersects(cell):
                out[c] = geom.intersection(cell).area / cell.area
        return out

    def rasterise(self, x0: float, y0: float, size0: float, out: int, ignore: int,
                  out_h: int | None = None, size0_h: float | None = None) -> np.ndarray:
        """Class index per pixel of the level-0 box resampled to (out_h, out); ``ignore`` where
        no region covers the pixel centre. Later classes win where regions overlap."""
        from PIL import Image, ImageDraw
        from shapely.geometry import MultiPolygon, Polygon, box

        out_h = out if out_h is None else out_h
        size0_h = size0 if size0_h is None else size0_h
        sx, sy = out / size0, out_h / size0_h
        cell = box(x0, y0, x0 + size0, y0 + size0_h)
        mask = np.full((out_h, out), ignore, np.uint8)
        for c, (geom, prep) in enumerate(zip(self.per_class, self.prepared)):
            if geom.is_empty or not prep.intersects(cell):
                continue
            part = geom.intersection(cell.buffer(max(size0, size0_h) * 0.01))
            polys = [part] if isinstance(part, Polygon) else [g for g in getattr(part, "geoms", []) if
                                                              isinstance(g, (Polygon, MultiPolygon))]
            layer = Image.new("L", (out, out_h), 0)
            draw = ImageDraw.Draw(layer)
            for poly in polys:
                for p in ([poly] if isinstance(poly, Polygon) else poly.geoms):
                    to_px = lambda ring: [((x - x0) * sx - 0.5, (y - y0) * sy - 0.5) for x, y in ring.coords]
                    draw.polygon(to_px(p.exterior), fill=1)
                    for hole in p.interiors:
                        draw.polygon(to_px(hole), fill=0)
            mask[np.asarray(layer, bool)] = c
        return mask


SKIPPED_OBJECTS = ("detection", "cell", "tile")


def _object_type(feature: dict) -> str:
    props = feature.get("properties") or {}
    return str(props.get("objectType") or props.get("object_type") or "annotation").lower()


def _polygonal(geom):
    """The polygonal part of a geometry (make_valid may return lines beside polygons)."""
    from shapely.geometry import GeometryCollection, MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    if isinstance(geom, GeometryCollection):
        polys = [g for g in geom.geoms if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
        if polys:
            from shapely.ops import unary_union

            return unary_union(polys)
    return None


def _check_bounds(path: Path, kept: list, bounds: tuple[float, float], notes: list[str]) -> list:
    """Drop (and name) features wholly outside the slide; refuse a file mostly outside it."""
    from shapely import affinity
    from shapely.geometry import box

    width, height = bounds
    slide = box(0, 0, width, height)
    total = sum(g.area for _, _, g in kept)
    inside = sum(g.intersection(slide).area for _, _, g in kept)
    if total > 0 and inside < 0.5 * total:
        swapped = sum(affinity.affine_transform(g, [0, 1, 1, 0, 0, 0]).intersection(slide).area for _, _, g in kept)
        hint = (f"with x and y swapped {100 * swapped / total:.0f} % would lie inside: export with QuPath's x/y order"
                if swapped > 0.9 * total else "are the coordinates level-0 pixels of this slide (not microns, not "
                "another slide's)?")
        raise AnnotationError(f"{path}: only {100 * inside / total:.0f} % of the annotated area lies inside the slide "
                              f"({width} x {height} px); {hint}")
    out = []
    for number, cls, geom in kept:
        if not geom.intersects(slide):
            notes.append(f"{path}: feature {number} ({cls}) lies outside the slide ({width} x {height} px): skipped")
            continue
        out.append((number, cls, geom))
    return out


def load_annotations(path: str | Path, classes: list[str], class_map: dict[str, int],
                     bounds: tuple[float, float] | None = None) -> Annotations:
    """``bounds``: the slide's level-0 (width, height), for the checks of the module docstring."""
    import shapely
    from shapely.geometry import shape
    from shapely.ops import unary_union

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not readable as JSON ({exc})") from exc
    features = _features(data, path)
    notes: list[str] = []
    detections = [f for f in features if isinstance(f, dict) and _object_type(f) in SKIPPED_OBJECTS]
    if detections:
        notes.append(f"{path}: {len(detections)} detection/cell object(s) skipped (they carry no region)")
    features = [f for f in features if isinstance(f, dict) and _object_type(f) not in SKIPPED_OBJECTS]
    found = sorted({_class_name(f) for f in features})
    unmapped = [n for n in found if n.lower() not in class_map]
    if unmapped:
        raise AnnotationError(f"{path}: annotation class(es) {unmapped} map to no class of {classes}; names found: "
                              f"{found}; add them to --class-map (e.g. --class-map \"{unmapped[0]}={classes[0]}\")")
    kept, no_area = [], 0
    for number, feature in enumerate(features):
        geometry = feature.get("geometry") or {}
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            no_area += 1  # points, lines, null geometry: no region
            continue
        try:
            geom = shape(geometry)
        except Exception as exc:  # shapely raises several types on malformed coordinates
            raise AnnotationError(f"{path}: feature {number} has a malformed {kind} ({exc})") from exc
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise AnnotationError(f"{path}: feature {number} ({_class_name(feature)}) has a non-finite coordinate "
                                  f"(NaN or infinity); fix or delete it in QuPath and export again")
        if not geom.is_valid:  # self-intersections from hand drawing: keep every lobe
            repaired = _polygonal(shapely.make_valid(geom))
            notes.append(f"{path}: feature {number} ({_class_name(feature)}) is self-intersecting: repaired, "
                         f"{repaired.area if repaired is not None else 0:.0f} px2 kept")
            geom = repaired
        else:
            geom = _polygonal(geom)
        if geom is None or geom.is_empty:
            no_area += 1
            continue
        kept.append((number, _class_name(feature), geom))
    if no_area:
        notes.append(f"{path}: {no_area} feature(s) without area (points, lines, empty or null geometry) skipped")
    if bounds is not None:
        kept = _check_bounds(path, kept, bounds, notes)
    parts: list[list] = [[] for _ in classes]
    for _, cls, geom in kept:
        parts[class_map[cls.lower()]].append(geom)
    per_class = [unary_union(p) if p else _empty() for p in parts]
    annotations = Annotations(per_class, found, path)
    annotations.notes = notes
    return annotations


def _empty():
    from shapely.geometry import Polygon

    return Polygon()
