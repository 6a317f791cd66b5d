"""QuPath GeoJSON problems are reported per feature, never silent: a bow-tie keeps its full
area, detections are skipped with a count, regions off the slide or with swapped x/y are
named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlps_dist.slides.annotations import AnnotationError, load_annotations  # noqa: E402

CLASSES = ["TE", "NEC", "LYM", "TAS"]
MAP = {"tumor": 0, "te": 0, "nec": 1, "lym": 2, "tas": 3}


def feature(coords, name="Tumor", kind="Polygon", object_type="annotation"):
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coords},
        "properties": {"objectType": object_type, "classification": {"name": name}},
    }


def write(path: Path, *features) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


def test_a_bow_tie_keeps_its_whole_area_and_is_reported(tmp_path):
    bow = write(tmp_path / "a.geojson", feature([[[0, 0], [400, 400], [400, 0], [0, 400], [0, 0]]]))
    ann = load_annotations(bow, CLASSES, MAP)
    assert ann.per_class[0].area == pytest.approx(80000)  # both lobes (buffer(0) keeps 40000)
    assert any("feature 0 (Tumor) is self-intersecting: repaired" in n for n in ann.notes)


def test_detections_and_areas_without_regions_are_skipped_with_a_count(tmp_path):
    path = write(
        tmp_path / "a.geojson",
        feature([[[0, 0], [50, 0], [50, 50], [0, 50], [0, 0]]]),
        *[
            feature([[[i, i], [i + 6, i], [i + 6, i + 6], [i, i]]], name="Cell", object_type="detection")
            for i in range(5)
        ],
        {"type": "Feature", "geometry": None, "properties": {"classification": {"name": "Tumor"}}},
    )
    ann = load_annotations(path, CLASSES, MAP)  # "Cell" is not in the class map: detections are not regions
    assert ann.per_class[0].area == pytest.approx(2500)
    assert any("5 detection/cell object(s) skipped" in n for n in ann.notes)
    assert any("1 feature(s) without area" in n for n in ann.notes)


def test_regions_off_the_slide_swapped_axes_and_nan_are_named(tmp_path):
    square = [[[600, 10], [700, 10], [700, 100], [600, 100], [600, 10]]]  # x beyond a 512 px wide slide
    with pytest.raises(AnnotationError, match="0 % of the annotated area lies inside.*with x and y swapped 100 %"):
        load_annotations(write(tmp_path / "a.geojson", feature(square)), CLASSES, MAP, bounds=(512, 768))
    far = [[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]]
    inside = [[[0, 0], [300, 0], [300, 300], [0, 300], [0, 0]]]
    ann = load_annotations(
        write(tmp_path / "b.geojson", feature(inside), feature(far)), CLASSES, MAP, bounds=(512, 768)
    )
    assert any("feature 1 (Tumor) lies outside the slide" in n for n in ann.notes)
    with pytest.raises(AnnotationError, match="feature 0 .* non-finite coordinate"):
        load_annotations(
            write(tmp_path / "c.geojson", feature([[[0, 0], [float("nan"), 5], [5, 5], [0, 0]]])), CLASSES, MAP
        )


def test_tile_slides_refuses_swapped_annotations_before_any_tile(tmp_path, capsys):
    from mlps_dist.synthetic.slides import CLASS_MAP, write_synthetic_slide

    write_synthetic_slide(tmp_path / "s" / "a.tiff", None, 768, 512, seed=1, cell_px=100)
    (tmp_path / "ann").mkdir()
    write(tmp_path / "ann" / "a.geojson", feature([[[10, 600], [100, 600], [100, 700], [10, 700], [10, 600]]]))
    from mlps_dist.cli import tile as tile_slides

    assert (
        tile_slides.main(
            [
                "--slides",
                str(tmp_path / "s"),
                "--out",
                str(tmp_path / "o"),
                "--mpp",
                "1",
                "--tile",
                "96",
                "--annotations",
                str(tmp_path / "ann"),
                "--class-map",
                CLASS_MAP,
                "--split-ratios",
                "1,0,0",
            ]
        )
        == 2
    )
    assert "swapped" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tile_slides_warns_about_an_annotated_slide_without_tiles(tmp_path, capsys):
    from mlps_dist.synthetic.slides import CLASS_MAP, write_synthetic_slide

    write_synthetic_slide(tmp_path / "s" / "a.tiff", None, 768, 512, seed=1, cell_px=100)
    (tmp_path / "ann").mkdir()
    write(tmp_path / "ann" / "a.geojson", feature([[[0, 0], [6, 0], [6, 6], [0, 6], [0, 0]]]))  # a speck on glass
    from mlps_dist.cli import tile as tile_slides

    assert (
        tile_slides.main(
            [
                "--slides",
                str(tmp_path / "s"),
                "--out",
                str(tmp_path / "o"),
                "--mpp",
                "1",
                "--tile",
                "96",
                "--annotations",
                str(tmp_path / "ann"),
                "--class-map",
                CLASS_MAP,
                "--split-ratios",
                "1,0,0",
            ]
        )
        == 0
    )
    assert "warning: slide a (train) gave no tiles" in capsys.readouterr().err
