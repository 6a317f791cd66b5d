"""Aperio ImageScope and ASAP annotation XML as GeoJSON-like features (level-0 pixels).

    features = read_xml_features(path)   # [{"type": "Feature", "geometry": {...}, "properties": {...}}]

The features are those of a QuPath GeoJSON export (``properties.classification.name`` the
class, ``objectType`` "annotation"), so annotations.load_annotations checks, repairs and maps
them exactly as it does GeoJSON.

ImageScope (``Annotations/Annotation/Regions/Region/Vertices/Vertex`` with ``X``/``Y``): the
class of a region is its Annotation's ``Name``; where that is empty, the ``Value`` of the
Annotation's first non-empty ``Attributes/Attribute``; where that is empty too, the
Region's ``Text``. A region with ``NegativeROA="1"`` is cut out of the other regions of
its Annotation (ImageScope's exclusion). An ellipse (``Type="2"``, two corner vertices)
becomes a 64-sided polygon; anything with fewer than three vertices (rulers, arrows) has no
area.

ASAP (``ASAP_Annotations/Annotations/Annotation`` with ``PartOfGroup``, and
``Coordinates/Coordinate`` with ``Order``, ``X``, ``Y``): the class is ``PartOfGroup``; the
vertices are taken in ``Order``. Dots and point sets have no area. Decimal commas (written
by ASAP under some locales) are read as points.

Parsed with xml.etree (the standard library; expat refuses entity expansion bombs).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from mlps_dist.core.errors import InputError

ELLIPSE_SIDES = 64


def _number(text: str | None, path: Path, where: str) -> float:
    try:
        return float(str(text).strip().replace(",", "."))
    except ValueError:
        raise InputError(f"{path}: {where}: coordinate {text!r} is not a number") from None


def _feature(name: str, ring: list[tuple[float, float]]) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def _no_area(name: str) -> dict:
    return {"type": "Feature", "geometry": None, "properties": {"classification": {"name": name}}}


def _cut(name: str, rings: list, holes: list) -> dict:
    """The union of ``rings`` minus the union of ``holes`` (each repaired first) as one feature."""
    import shapely
    from shapely.geometry import Polygon, mapping
    from shapely.ops import unary_union

    solid = lambda ring: shapely.make_valid(Polygon(ring)).buffer(0)  # noqa: E731 (polygonal part only)
    geom = unary_union([solid(r) for r in rings]).difference(unary_union([solid(h) for h in holes]))
    if geom.is_empty:
        return _no_area(name)
    return {
        "type": "Feature",
        "geometry": mapping(geom),
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def _closed(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return ring + [ring[0]] if ring and ring[0] != ring[-1] else ring


def _ellipse(a: tuple[float, float], b: tuple[float, float]) -> list[tuple[float, float]]:
    cx, cy, rx, ry = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2, abs(b[0] - a[0]) / 2, abs(b[1] - a[1]) / 2
    return [
        (cx + rx * math.cos(2 * math.pi * k / ELLIPSE_SIDES), cy + ry * math.sin(2 * math.pi * k / ELLIPSE_SIDES))
        for k in range(ELLIPSE_SIDES)
    ]


def _imagescope(root: ET.Element, path: Path) -> list[dict]:
    features = []
    for number, annotation in enumerate(root.iter("Annotation")):
        layer = (annotation.get("Name") or "").strip()
        if not layer:
            values = [(a.get("Value") or "").strip() for a in annotation.findall("Attributes/Attribute")]
            layer = next((v for v in values if v), "")
        positive, negative = [], []
        for region in annotation.findall("Regions/Region"):
            where = f"Annotation {number} Region {region.get('Id', '?')}"
            ring = [
                (_number(v.get("X"), path, where), _number(v.get("Y"), path, where))
                for v in region.findall("Vertices/Vertex")
            ]
            if region.get("Type") == "2" and len(ring) == 2:
                ring = _ellipse(*ring)
            name = layer or (region.get("Text") or "").strip() or "(unclassified)"
            if len(ring) < 3:
                features.append(_no_area(name))
                continue
            (negative if region.get("NegativeROA") == "1" else positive).append((name, _closed(ring)))
        if negative:  # exclusions belong to the whole Annotation: one feature per class of it
            for name in sorted({n for n, _ in positive}):
                features.append(_cut(name, [r for n, r in positive if n == name], [r for _, r in negative]))
        else:
            features += [_feature(name, ring) for name, ring in positive]
    return features


def _asap(root: ET.Element, path: Path) -> list[dict]:
    features = []
    for number, annotation in enumerate(root.iter("Annotation")):
        name = (annotation.get("PartOfGroup") or "").strip() or "(unclassified)"
        where = f"Annotation {number} ({annotation.get('Name', '')})"
        coords = annotation.findall("Coordinates/Coordinate")
        order = [_number(c.get("Order", i), path, where) for i, c in enumerate(coords)]
        ring = [
            (_number(c.get("X"), path, where), _number(c.get("Y"), path, where))
            for _, c in sorted(zip(order, coords), key=lambda t: t[0])
        ]
        kind = (annotation.get("Type") or "Polygon").lower()
        if len(ring) < 3 or kind in ("dot", "pointset"):
            features.append(_no_area(name))
            continue
        features.append(_feature(name, _closed(ring)))
    return features


def read_xml_features(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise InputError(f"{path}: not readable as XML ({exc})") from exc
    if root.tag == "ASAP_Annotations":
        return _asap(root, path)
    if root.tag == "Annotations":
        return _imagescope(root, path)
    raise InputError(
        f"{path}: XML root <{root.tag}> is neither ImageScope <Annotations> nor <ASAP_Annotations>; "
        f"export the annotations as QuPath GeoJSON, ImageScope XML or ASAP XML"
    )
