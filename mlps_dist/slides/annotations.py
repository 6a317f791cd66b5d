"""Region annotations (QuPath GeoJSON, ImageScope or ASAP XML): class polygons, per-class
coverage, raster masks.

A QuPath export is a FeatureCollection of Polygon/MultiPolygon features in level-0 pixel
coordinates, the class name in ``properties.classification.name``; holes are kept. A file
whose first character is ``<`` is read as ImageScope or ASAP XML (annotation_xml.py), turned
into the same features. Names map to the dataset's classes, or to ``ignore``, through
``--class-map`` (class_map.py: exact names, class names, then glob patterns; case-insensitive).
A name with area that maps to nothing is an error naming it, the file and --class-map, so a
typo cannot silently drop regions.

Ignore regions are cut out of every class's region: they count for no class in a train
tile's coverage (so for no label) and carry the ignore index in val/test masks, also where
they overlap a class region. Where class regions overlap each other, each counts for its own
class in coverage, and in masks the class later in ``--classes`` wins.

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

from mlps_dist.core.errors import InputError
from mlps_dist.slides.class_map import IGNORE, ClassMap, as_class_map, parse_class_map  # noqa: F401 (re-exported)

AREA_TYPES = ("Polygon", "MultiPolygon", "GeometryCollection")


class AnnotationError(InputError):
    """A GeoJSON file that cannot be used (unreadable, unknown geometry, unmapped class)."""


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
        self.mapping: dict[str, str] = {}  # name found -> class name or "ignore"

    def coverage(self, x0: float, y0: float, size0: float, size0_h: float | None = None) -> np.ndarray:
        from shapely.geometry import box

        cell = box(x0, y0, x0 + size0, y0 + (size0_h or size0))
        out = np.zeros(len(self.per_class), np.float64)
        for c, (geom, prep) in enumerate(zip(self.per_class, self.prepared)):
            if not geom.is_empty and prep.intersects(cell):
                out[c] = geom.intersection(cell).area / cell.area
        return out

    def rasterise(
        self,
        x0: float,
        y0: float,
        size0: float,
        out: int,
        ignore: int,
        out_h: int | None = None,
        size0_h: float | None = None,
    ) -> np.ndarray:
        """Class index per pixel of the level-0 box resampled to (out_h, out); ``ignore`` where
        no region covers the pixel centre (ignore regions are cut out of the classes' regions
        at load). Later classes win where regions overlap."""
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
            polys = (
                [part]
                if isinstance(part, Polygon)
                else [g for g in getattr(part, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
            )
            layer = Image.new("L", (out, out_h), 0)
            draw = ImageDraw.Draw(layer)
            for poly in polys:
                for p in [poly] if isinstance(poly, Polygon) else poly.geoms:
                    to_px = lambda ring: [((x - x0) * sx - 0.5, (y - y0) * sy - 0.5) for x, y in ring.coords]  # noqa: E731
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
        hint = (
            f"with x and y swapped {100 * swapped / total:.0f} % would lie inside: export with QuPath's x/y order"
            if swapped > 0.9 * total
            else "are the coordinates level-0 pixels of this slide (not microns, not another slide's)?"
        )
        raise AnnotationError(
            f"{path}: only {100 * inside / total:.0f} % of the annotated area lies inside the slide "
            f"({width} x {height} px); {hint}"
        )
    out = []
    for number, cls, geom in kept:
        if not geom.intersects(slide):
            notes.append(f"{path}: feature {number} ({cls}) lies outside the slide ({width} x {height} px): skipped")
            continue
        out.append((number, cls, geom))
    return out


def read_features(path: Path) -> list[dict]:
    """The features of a GeoJSON file, or of an ImageScope/ASAP XML file (first character ``<``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not readable ({exc})") from exc
    if text.lstrip().startswith("<"):
        from mlps_dist.slides.annotation_xml import read_xml_features

        return read_xml_features(path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AnnotationError(f"{path}: not readable as JSON ({exc})") from exc
    return _features(data, path)


def _has_area(feature: dict) -> bool:
    geometry = feature.get("geometry")
    return isinstance(geometry, dict) and geometry.get("type") in AREA_TYPES


def load_annotations(
    path: str | Path, classes: list[str], class_map: ClassMap | dict, bounds: tuple[float, float] | None = None
) -> Annotations:
    """``bounds``: the slide's level-0 (width, height), for the checks of the module docstring.
    ``class_map``: a ClassMap, or a {lower-case name: class index} dict."""
    import shapely
    from shapely.geometry import shape
    from shapely.ops import unary_union

    path = Path(path)
    class_map = as_class_map(class_map, classes)
    features = read_features(path)
    notes: list[str] = []
    detections = [f for f in features if isinstance(f, dict) and _object_type(f) in SKIPPED_OBJECTS]
    if detections:
        notes.append(f"{path}: {len(detections)} detection/cell object(s) skipped (they carry no region)")
    features = [f for f in features if isinstance(f, dict) and _object_type(f) not in SKIPPED_OBJECTS]
    found = sorted({_class_name(f) for f in features if _has_area(f)})  # names of points/lines do not matter
    unmapped = [n for n in found if class_map.lookup(n) is None]
    if unmapped:
        raise AnnotationError(
            f"{path}: annotation class(es) {unmapped} map to no class of {classes}; names found: "
            f'{found}; add them to --class-map (e.g. --class-map "{unmapped[0]}={classes[0]}", '
            f'or "{unmapped[0]}=ignore" to leave its regions out)'
        )
    kept, no_area = [], 0
    for number, feature in enumerate(features):
        if not _has_area(feature):
            no_area += 1  # points, lines, null geometry: no region
            continue
        kind = feature["geometry"]["type"]
        try:
            geom = shape(feature["geometry"])
        except Exception as exc:  # shapely raises several types on malformed coordinates
            raise AnnotationError(f"{path}: feature {number} has a malformed {kind} ({exc})") from exc
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise AnnotationError(
                f"{path}: feature {number} ({_class_name(feature)}) has a non-finite coordinate "
                f"(NaN or infinity); fix or delete it in QuPath and export again"
            )
        if not geom.is_valid:  # self-intersections from hand drawing: keep every lobe
            repaired = _polygonal(shapely.make_valid(geom))
            notes.append(
                f"{path}: feature {number} ({_class_name(feature)}) is self-intersecting: repaired, "
                f"{repaired.area if repaired is not None else 0:.0f} px2 kept"
            )
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
    ignored_parts, ignored_names = [], set()
    for _, cls, geom in kept:
        target = class_map.lookup(cls)
        if target == IGNORE:
            ignored_parts.append(geom)
            ignored_names.add(cls)
        else:
            parts[target].append(geom)
    ignored = unary_union(ignored_parts) if ignored_parts else _empty()
    per_class = [unary_union(p) if p else _empty() for p in parts]
    if not ignored.is_empty:  # ignore wins where it overlaps a class region (labels and masks agree)
        per_class = [g.difference(ignored) if not g.is_empty else g for g in per_class]
        notes.append(
            f"{path}: {len(ignored_parts)} region(s) of {sorted(ignored_names)} mapped to ignore "
            f"({ignored.area:.0f} px2): in no label, the ignore index in masks"
        )
    annotations = Annotations(per_class, found, path)
    annotations.mapping = {n: class_map.target_name(class_map.lookup(n)) for n in found}
    annotations.notes = notes
    return annotations


def _empty():
    from shapely.geometry import Polygon

    return Polygon()
