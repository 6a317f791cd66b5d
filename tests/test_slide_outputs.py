"""What segment_slides hands back to a viewer: regions.geojson (QuPath annotations), the
index TIFF, probability maps, the overlay, slide-level stain, summary.csv and progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlps_dist.slides.regions import region_features, regions_of
from mlps_dist.slides.synthetic import write_synthetic_slide

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_slides import CELL, ColourModel, H, W  # noqa: E402

NAMES = ColourModel.classes
PALETTE = ColourModel.palette


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two flat-colour slides segmented by the nearest-colour model, with probability maps."""
    from mlps_dist import segment_slides

    root = tmp_path_factory.mktemp("outputs")
    for i in range(2):
        write_synthetic_slide(root / "slides" / f"flat{i}.tiff", None, W, H, seed=20 + i, cell_px=CELL, flat=True)
    out = root / "maps"
    args = segment_slides.parse_args(["--run", "runs/r", "--slides", str(root / "slides"), "--out", str(out),
                                      "--map-mpp", "4"])
    assert segment_slides.run(args, model=ColourModel()) == 0
    return root, out


def rasterise(features: list[dict], shape: tuple[int, int], px0: float, ignore: int) -> np.ndarray:
    """Class per map pixel centre from level-0 polygons (holes cut out), later classes on top."""
    out = np.full(shape, ignore, np.uint8)
    for feature in features:
        c = NAMES.index(feature["properties"]["classification"]["name"])
        geom = feature["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        layer = Image.new("L", shape[::-1], 0)
        draw = ImageDraw.Draw(layer)
        for rings in polys:
            to_px = [[(x / px0 - 0.5, y / px0 - 0.5) for x, y in ring] for ring in rings]
            draw.polygon(to_px[0], fill=1)
            for hole in to_px[1:]:
                draw.polygon(hole, fill=0)
        out[np.asarray(layer, bool)] = c
    return out


def test_regions_round_trip_to_the_class_map(maps):
    from mlps_dist.slides.annotations import load_annotations, parse_class_map

    root, out = maps
    for name in ("flat0", "flat1"):
        classes = np.asarray(Image.open(out / name / "classes.png"))
        summary = json.loads((out / name / "summary.json").read_text())
        data = json.loads((out / name / "regions.geojson").read_text())
        features = data["features"]
        assert data["type"] == "FeatureCollection" and len(features) >= 4
        for f in features:
            props = f["properties"]
            assert f["type"] == "Feature" and props["objectType"] == "annotation"
            assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
            c = NAMES.index(props["classification"]["name"])
            assert props["classification"]["color"] == list(PALETTE[c])
            assert set(props["measurements"]) == {"area_um2", "mean_probability"}
            assert 0 < props["measurements"]["mean_probability"] <= 1.0
        assert len({f["id"] for f in features}) == len(features)
        area = np.array([f["properties"]["measurements"]["area_um2"] for f in features])
        prob = np.array([f["properties"]["measurements"]["mean_probability"] for f in features])
        assert (area * prob).sum() / area.sum() > 0.9  # flat colours: confident but at borders
        back = rasterise(features, classes.shape, 4.0, 4)  # level-0 px per map px: 4 um / 1 um
        tissue = classes != 4
        assert (back[tissue] == classes[tissue]).mean() > 0.98
        assert (back[~tissue] == 4).mean() > 0.98
        for c, cls in enumerate(NAMES):  # the polygons' own areas against summary.json
            area = sum(_area(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == cls)
            assert area * 1e-6 == pytest.approx(summary["area_mm2"][cls], rel=0.01, abs=1e-4)
            measured = sum(f["properties"]["measurements"]["area_um2"] for f in features
                           if f["properties"]["classification"]["name"] == cls)
            assert measured * 1e-6 == pytest.approx(summary["area_mm2"][cls], abs=1e-6)
        assert sum(summary["regions"].values()) == len(features) and summary["regions_dropped"] == 0
        # the annotation reader of tile_slides takes it as it is
        ann = load_annotations(out / name / "regions.geojson", NAMES, parse_class_map(None, NAMES),
                               bounds=(W, H))
        assert not ann.notes
        for c, cls in enumerate(NAMES):
            assert ann.per_class[c].area * 1e-6 == pytest.approx(summary["area_mm2"][cls], rel=0.01, abs=1e-4)


def _area(geom: dict) -> float:
    from shapely.geometry import shape

    return shape(geom).area


def test_regions_keep_holes_and_corner_touching_pieces():
    """A ring of class 0 around class 1 around a hole of no tissue: the ring has a hole
    holding class 1's polygon, which has its own hole; two pixels touching at a corner are
    one region (a MultiPolygon)."""
    m = np.full((12, 12), 4, np.uint8)
    m[1:9, 1:9] = 0
    m[3:7, 3:7] = 1
    m[4:6, 4:6] = 4
    m[10, 10] = m[11, 11] = 2
    regions = region_features(m, None, NAMES, PALETTE, slide="s", px0=2.0, map_mpp=4.0, simplify=0)
    by_class = {int(c): g for c, g in zip(regions.region_class, regions.geoms)}
    ring, inner, corner = by_class[0], by_class[1], by_class[2]
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1 and ring.area == (64 - 16) * 4
    assert inner.geom_type == "Polygon" and len(inner.interiors) == 1 and inner.area == (16 - 4) * 4
    assert corner.geom_type == "MultiPolygon" and len(corner.geoms) == 2 and corner.is_valid
    assert len(regions.geoms) == 3  # the ignore index has no regions
    data = json.loads(regions.geojson_bytes())
    assert [f["geometry"]["type"] for f in data["features"]] == ["Polygon", "Polygon", "MultiPolygon"]
    assert len(data["features"][0]["geometry"]["coordinates"]) == 2  # outer ring and hole


def test_traced_pieces_are_valid_and_exact_on_random_maps():
    """Speckle is the hard case: pieces touching themselves at corners, holes reaching the
    outside through a corner. Every piece is valid, has its pixel count as area and the
    pieces form an edge-matched coverage."""
    import shapely

    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(1, 14, 2)
        m = rng.integers(0, 4, (h, w)).astype(np.uint8)
        labels, keys, polys, _, _ = regions_of(m, 3)
        assert all(p.is_valid for p in polys)
        assert [p.area for p in polys] == [float((labels == k).sum()) for k in keys]
        if len(polys):
            assert shapely.coverage_is_valid(polys)
            assert all(g.is_valid for g in shapely.coverage_simplify(polys, 1.0))


def test_min_region_drops_small_regions_and_counts_them():
    m = np.full((20, 20), 4, np.uint8)
    m[2:12, 2:12] = 0
    m[15, 15] = 1
    regions = region_features(m, None, NAMES, PALETTE, slide="s", px0=1.0, map_mpp=4.0, min_area_um2=50.0)
    assert list(regions.region_class) == [0]  # the 16 um2 speck is dropped
    assert regions.summary()["regions_dropped"] == 1 and regions.summary()["regions_dropped_um2"] == 16.0


def test_regions_are_byte_identical_for_the_same_map():
    rng = np.random.default_rng(3)
    m = rng.integers(0, 5, (40, 50)).astype(np.uint8)
    probs = rng.random((4, 40, 50))
    a = region_features(m, probs, NAMES, PALETTE, slide="s", px0=2.5, map_mpp=4.0).geojson_bytes()
    b = region_features(m.copy(), probs.copy(), NAMES, PALETTE, slide="s", px0=2.5, map_mpp=4.0).geojson_bytes()
    assert a == b
