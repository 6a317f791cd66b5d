"""What segment_slides hands back to a viewer: regions.geojson (QuPath annotations), the
index TIFF, probability maps, the overlay, slide-level stain, summary.csv and progress."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import CELL, ColourModel, H, W  # noqa: E402

from mlps_dist.slides.regions import region_features, regions_of
from mlps_dist.synthetic.slides import write_synthetic_slide

NAMES = ColourModel.classes
PALETTE = ColourModel.palette


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two flat-colour slides segmented by the nearest-colour model, with probability maps."""
    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.deploy import segment_slides

    root = tmp_path_factory.mktemp("outputs")
    for i in range(2):
        write_synthetic_slide(root / "slides" / f"flat{i}.tiff", None, W, H, seed=20 + i, cell_px=CELL, flat=True)
    out = root / "maps"
    args = segment_cmd.parse_args(
        ["--run", "runs/r", "--slides", str(root / "slides"), "--out", str(out), "--map-mpp", "4", "--probabilities"]
    )
    assert segment_slides.run(args, model=ColourModel()) == 0
    return root, out


def rasterise(features: list[dict], shape: tuple[int, int], px0: float, ignore: int) -> np.ndarray:
    """Class per map pixel: the feature whose polygon (holes cut out) holds the pixel's
    centre, in level-0 coordinates (as QuPath would see it)."""
    import shapely
    from shapely.geometry import shape as to_shape

    out = np.full(shape, ignore, np.uint8)
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    cx, cy = (xs + 0.5) * px0, (ys + 0.5) * px0
    for feature in features:
        inside = shapely.contains_xy(to_shape(feature["geometry"]), cx, cy)
        out[inside] = NAMES.index(feature["properties"]["classification"]["name"])
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
        assert (back[tissue] == classes[tissue]).mean() > 0.99  # 1 map px of simplification
        assert (back[~tissue] == 4).mean() > 0.99
        for _c, cls in enumerate(NAMES):  # the polygons' own areas against summary.json
            area = sum(_area(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == cls)
            assert area * 1e-6 == pytest.approx(summary["area_mm2"][cls], rel=0.01, abs=1e-4)
            measured = sum(
                f["properties"]["measurements"]["area_um2"]
                for f in features
                if f["properties"]["classification"]["name"] == cls
            )
            assert measured * 1e-6 == pytest.approx(summary["area_mm2"][cls], abs=1e-6)
        assert sum(summary["regions"].values()) == len(features) and summary["regions_dropped"] == 0
        # the annotation reader of tile_slides takes it as it is
        ann = load_annotations(out / name / "regions.geojson", NAMES, parse_class_map(None, NAMES), bounds=(W, H))
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


def test_classes_tiff_holds_indices_with_the_palette_and_resolution(maps, tmp_path):
    import tifffile

    from mlps_dist.slides.tiff import write_index_tiff

    _, out = maps
    classes = np.asarray(Image.open(out / "flat0" / "classes.png"))
    with tifffile.TiffFile(out / "flat0" / "classes.tiff") as tif:
        page = tif.pages[0]
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.is_tiled
        np.testing.assert_array_equal(page.asarray(), classes)  # pixels are data, not colours
        colormap = page.tags["ColorMap"].value
        np.testing.assert_array_equal(colormap[:, :5].T // 257, np.asarray(PALETTE))
        assert page.tags["XResolution"].value == (2500, 1) and page.tags["ResolutionUnit"].value == 3  # 4 um/px
    # reduced levels pick pixels: every index in them is an index of the map
    big = np.random.default_rng(0).integers(0, 5, (1100, 1300)).astype(np.uint8)
    write_index_tiff(tmp_path / "big.tiff", big, PALETTE, 4.0)
    with tifffile.TiffFile(tmp_path / "big.tiff") as tif:
        levels = [p.asarray() for p in tif.pages]
        assert [lv.shape for lv in levels] == [(1100, 1300), (550, 650), (275, 325)]
        np.testing.assert_array_equal(levels[1], big[::2, ::2])
        np.testing.assert_array_equal(levels[2], big[::4, ::4])
        assert tif.pages[2].tags["XResolution"].value == (625, 1)  # 16 um/px


def test_probabilities_tiff_planes_agree_with_the_class_map(maps):
    import tifffile

    _, out = maps
    classes = np.asarray(Image.open(out / "flat1" / "classes.png"))
    with tifffile.TiffFile(out / "flat1" / "probabilities.tiff") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"
        planes = tif.series[0].asarray()
        assert "TE" in tif.ome_metadata and 'PhysicalSizeX="4.0"' in tif.ome_metadata
    assert planes.shape == (4, *classes.shape) and planes.dtype == np.uint8
    tissue = classes != 4
    assert (planes.argmax(0)[tissue] == classes[tissue]).mean() > 0.99
    assert planes[:, tissue].sum(0).min() >= 250  # per pixel, probabilities sum to 1 (x 255, rounded)


def test_overlay_is_large_with_the_slide_beside_it_and_a_legend(maps):
    from mlps_dist.core.draw import blend
    from mlps_dist.slides.overlay import ALPHA, panel_origins, view_mpp
    from mlps_dist.slides.reader import Slide

    root, out = maps
    overlay = np.asarray(Image.open(out / "flat0" / "overlay.png").convert("RGB"))
    summary = json.loads((out / "flat0" / "summary.json").read_text())
    assert summary["overlay"]["mpp"] == 1.0  # the slide's own pixels: 768 px < 2048
    h, w = overlay.shape[:2]
    assert w > 2 * W and H < h < H + 200 and max(w, h) >= max(W, H)
    with Slide(root / "slides" / "flat0.tiff") as slide:
        view = slide.read_scaled(1.0)
    (left, top), (right, _) = panel_origins(H, W)
    np.testing.assert_array_equal(overlay[top : top + H, left : left + W], view)  # the slide, untouched
    classes = np.asarray(Image.open(out / "flat0" / "classes.png"))
    tinted = overlay[top : top + H, right : right + W]
    up = classes.repeat(4, 0).repeat(4, 1)  # the map enlarged by nearest: 4 um -> 1 um
    blended = blend(view, up, PALETTE, ALPHA)
    np.testing.assert_array_equal(tinted[up != 4], blended[up != 4])  # classes blended in on tissue
    np.testing.assert_array_equal(tinted[up == 4], view[up == 4])  # glass left as it is
    footer = overlay[top + H + 4 :]
    for colour in PALETTE[:4]:  # a swatch per class
        assert (footer == np.asarray(colour, np.uint8)).all(-1).sum() > 50, colour
    assert (footer.max(-1) < 60).sum() > 200  # text and scale bar
    # a large slide is shown 2048 px long, a map larger than that at its own size
    assert view_mpp(20000, 10000, 0.5, 8.0) == pytest.approx(0.5 * 20000 / 2048)
    assert view_mpp(100000, 80000, 0.25, 8.0) == 8.0


def test_summary_csv_names_the_run_checkpoint_and_settings(maps):
    import csv

    _, out = maps
    rows = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert [r["slide"] for r in rows] == ["flat0", "flat1"] and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["run"] == "runs/r" and row["checkpoint"] == "best" and row["model"] == "ColourModel"
        assert row["stride"] == "16" and row["patch_size"] == "32" and row["model_mpp"] == "2.0"
        assert row["simplify"] == "1.0" and row["min_region_um2"] == "0.0" and row["probabilities"] == "True"
        assert row["stain_scope"] == "none" and row["slide_mpp"] == ""


class StainColourModel(ColourModel):
    """The nearest-colour model with a stain reference; it records how it was called."""

    def __init__(self, normaliser):
        self.stain = normaliser
        self.calls = []

    def scores(self, tiles, out_size, stain=True):
        self.calls.append(stain)
        if stain:
            tiles = self.stain.tiles(tiles)
        return super().scores(tiles, out_size)


def test_stains_are_estimated_once_per_slide_and_recorded(tmp_path, capsys):
    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.core.stain import StainNormaliser, fit_reference
    from mlps_dist.deploy import segment_slides
    from mlps_dist.slides.reader import Slide
    from mlps_dist.slides.slide_stain import SlideStain

    write_synthetic_slide(tmp_path / "slides" / "tex.tiff", None, W, H, seed=4, cell_px=CELL)
    with Slide(tmp_path / "slides" / "tex.tiff") as slide:
        pale = (255 - (255 - slide.read(128, 128, 256, 128).astype(np.float32)) * 0.6).astype(np.uint8)
    normaliser = StainNormaliser(fit_reference("macenko", [pale]))  # a paler lab's reference

    def run(out, *extra):
        model = StainColourModel(normaliser)
        args = segment_cmd.parse_args(
            ["--run", "r", "--slides", str(tmp_path / "slides"), "--out", str(out), "--map-mpp", "4", *extra]
        )
        assert segment_slides.run(args, model=model) == 0
        return model, json.loads((out / "tex" / "summary.json").read_text())

    model, summary = run(tmp_path / "slide")
    record = summary["stain"]
    assert record["method"] == "macenko" and record["scope"] == "slide" and record["tiles"] == 32
    vectors = np.asarray(record["estimate"]["vectors"])
    assert vectors.shape == (2, 3) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert len(record["estimate"]["scale"]) == 2
    assert model.calls and not any(model.calls)  # every tile came normalised with the slide's estimate
    # one estimate for all tiles: a tile's pixels depend on the tile alone, not on its neighbours
    with Slide(tmp_path / "slides" / "tex.tiff") as slide:
        tile = slide.read(200, 100, 64, 32)
    stain = SlideStain(normaliser, record)
    np.testing.assert_array_equal(stain(tile)[:16], stain(np.concatenate([tile[:16], 255 - tile[16:]]))[:16])
    err = capsys.readouterr().err
    assert f"segment_slides: tiles: {summary['tiles']}/{summary['tiles']} tiles (100 %)" in err
    assert "segment_slides: tissue: 1/1 slides (100 %)" in err and "tex written" in err
    model, summary = run(tmp_path / "tile", "--stain-scope", "tile")
    assert summary["stain"]["scope"] == "tile" and all(model.calls)


def test_od_match_scales_each_slide_as_a_whole(tmp_path):
    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.core.stain_match import OpticalDensityMatcher, fit_od_match
    from mlps_dist.deploy import segment_slides
    from mlps_dist.slides.reader import Slide

    write_synthetic_slide(tmp_path / "slides" / "tex.tiff", None, W, H, seed=4, cell_px=CELL)
    with Slide(tmp_path / "slides" / "tex.tiff") as slide:
        pale = (255 - (255 - slide.read(128, 128, 256, 128).astype(np.float32)) * 0.6).astype(np.uint8)
    model = StainColourModel(OpticalDensityMatcher(fit_od_match([pale])))  # a paler lab's training patches
    args = segment_cmd.parse_args(
        ["--run", "r", "--slides", str(tmp_path / "slides"), "--out", str(tmp_path / "o"), "--map-mpp", "4"]
    )
    assert segment_slides.run(args, model=model) == 0
    record = json.loads((tmp_path / "o" / "tex" / "summary.json").read_text())["stain"]
    assert record["method"] == "od_match" and record["scope"] == "slide"
    gain = np.asarray(record["estimate"]["gain"])
    assert gain.shape == (3,) and (gain < 0.9).all()  # the slide is darker than the training patches
    assert model.calls and not any(model.calls)  # every tile came matched with the slide's gains
