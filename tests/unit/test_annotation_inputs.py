"""Which annotation file tile_slides uses for a slide (NAME.geojson, NAME.EXT.geojson, XML,
--annotations-map), that the choice and the class map are part of a part's key, and its
progress lines in a log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlps_dist.cli import tile as tile_slides  # noqa: E402
from mlps_dist.core.errors import InputError  # noqa: E402
from mlps_dist.synthetic.slides import CLASS_MAP, write_synthetic_slide  # noqa: E402

W, H = 384, 256


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    """Two small slides (s0.tiff, s1.tiff) and their GeoJSON under ann/ as s0.geojson, s1.geojson."""
    root = tmp_path_factory.mktemp("inputs")
    for i in range(2):
        write_synthetic_slide(
            root / "slides" / f"s{i}.tiff", root / "ann" / f"s{i}.geojson", W, H, seed=20 + i, cell_px=100
        )
    return root


def args(wsi: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--slides",
        str(wsi / "slides"),
        "--out",
        str(out),
        "--mpp",
        "2",
        "--tile",
        "32",
        "--class-map",
        CLASS_MAP,
        "--split-ratios",
        "1,0,0",
        *extra,
    ]


def copy_ann(wsi: Path, dest: Path, names: dict[str, str]) -> Path:
    dest.mkdir(parents=True)
    for src, name in names.items():
        shutil.copy(wsi / "ann" / src, dest / name)
    return dest


def test_qupath_export_names_are_found_and_recorded(wsi, tmp_path, capsys):
    """s0.tiff.geojson (QuPath's export name) and s1.geojson: both found; a detection in one
    is skipped with a count; info.json names each slide's file and its sha256."""
    from mlps_dist.core.fileio import sha256_file

    ann = copy_ann(wsi, tmp_path / "ann", {"s0.geojson": "s0.tiff.geojson", "s1.geojson": "s1.geojson"})
    data = json.loads((ann / "s1.geojson").read_text())
    cell = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[9, 9], [15, 9], [15, 15], [9, 9]]]},
        "properties": {"objectType": "detection", "classification": {"name": "Lymphocyte"}},
    }
    data["features"] += [cell, cell]
    (ann / "s1.geojson").write_text(json.dumps(data))
    out = tmp_path / "out"
    assert tile_slides.main(args(wsi, out, "--annotations", str(ann))) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["annotations"]["s0"]["file"] == str(ann / "s0.tiff.geojson")
    assert info["annotations"]["s0"]["sha256"] == sha256_file(ann / "s0.tiff.geojson")
    assert info["annotations"]["s1"]["classes"]["Tumor"] == "TE"
    assert info["splits"]["train"]["slides"] == ["s0", "s1"] and info["splits"]["train"]["count"] > 0
    assert "s1.geojson: 2 detection/cell object(s) skipped" in capsys.readouterr().err


def test_two_files_for_one_slide_are_refused_naming_both(wsi, tmp_path):
    ann = copy_ann(wsi, tmp_path / "ann", {"s0.geojson": "s0.geojson", "s1.geojson": "s1.geojson"})
    shutil.copy(ann / "s0.geojson", ann / "s0.tiff.geojson")
    with pytest.raises(InputError, match=r"s0.tiff: more than one annotation file: .*s0.geojson, .*s0.tiff.geojson"):
        tile_slides._main(args(wsi, tmp_path / "out", "--annotations", str(ann)))
    (ann / "s0.tiff.geojson").unlink()
    (ann / "s1.geojson").unlink()
    with pytest.raises(InputError, match=r"no annotations for slide\(s\): s1 \(no s1.geojson or s1.tiff.geojson"):
        tile_slides._main(args(wsi, tmp_path / "out", "--annotations", str(ann)))
    assert not (tmp_path / "out").exists()


def test_annotations_map_csv(wsi, tmp_path):
    """Rows name files relative to the CSV (a header and comments allowed, the slide by name
    or file name); with --annotations, slides without a row are looked up in the folder."""
    maps = tmp_path / "maps"
    copy_ann(wsi, maps / "files", {"s0.geojson": "first.json", "s1.geojson": "second.geojson"})
    csv = maps / "ann.csv"
    csv.write_text("slide,annotations\n# the cohort's exports\ns0,files/first.json\ns1.tiff,files/second.geojson\n")
    out = tmp_path / "out"
    assert tile_slides.main(args(wsi, out, "--annotations-map", str(csv))) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["annotations"]["s0"]["file"] == str(maps / "files" / "first.json")
    assert info["annotations"]["s1"]["file"] == str(maps / "files" / "second.geojson")
    csv.write_text("s0,files/first.json\n")
    assert (
        tile_slides.main(args(wsi, tmp_path / "out2", "--annotations-map", str(csv), "--annotations", str(wsi / "ann")))
        == 0
    )
    info = json.loads((tmp_path / "out2" / "info.json").read_text())
    assert info["annotations"]["s1"]["file"] == str(wsi / "ann" / "s1.geojson")
    for text, message in (
        ("s0,files/first.json\n", r"no annotations for slide\(s\): s1 \(no row in"),
        (
            "s0,files/missing.geojson\ns1,files/second.geojson\n",
            r"line 1: annotation file .*missing.geojson of slide 's0' does not exist",
        ),
        (
            "s0,files/first.json\ns1,files/second.geojson\ns7,files/first.json\n",
            r"line 3: slide 's7' is not among --slides",
        ),
        (
            "s0,files/first.json\ns0.tiff,files/second.geojson\n",
            r"line 2: slide 's0' is named a "
            "second time",
        ),
    ):
        csv.write_text(text)
        with pytest.raises(InputError, match=message):
            tile_slides._main(args(wsi, tmp_path / "bad", "--annotations-map", str(csv)))
    assert not (tmp_path / "bad").exists()


def test_the_chosen_file_and_the_class_map_are_part_of_the_key(wsi, tmp_path, capsys):
    ann = copy_ann(wsi, tmp_path / "ann", {"s0.geojson": "s0.geojson", "s1.geojson": "s1.geojson"})
    out = tmp_path / "out"
    base = args(wsi, out, "--annotations", str(ann), "--keep-parts")
    assert tile_slides.main(base) == 0
    assert tile_slides.main(base) == 0
    assert "reused 2 slide(s)" in capsys.readouterr().out
    (ann / "s0.geojson").rename(ann / "s0.tiff.geojson")  # the same content under another name
    assert tile_slides.main(base) == 0
    assert "reused 1 slide(s)" in capsys.readouterr().out
    remapped = base[:]
    remapped[remapped.index("--class-map") + 1] = CLASS_MAP.replace("Stroma=TAS", "Strom*=ignore")
    assert tile_slides.main(remapped) == 0
    captured = capsys.readouterr().out
    assert "reused" not in captured and "'TAS': 0" in captured
    info = json.loads((out / "info.json").read_text())
    assert info["class_map"]["patterns"] == [["strom*", "ignore"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_plain_lines_on_stderr_off_a_terminal(wsi, tmp_path, capsys, workers):
    from mlps_dist.slides.grid import tile_grid

    out = tmp_path / "out"
    base = args(wsi, out, "--annotations", str(wsi / "ann"), "--workers", str(workers), "--keep-parts")
    assert tile_slides.main(base) == 0
    err = capsys.readouterr().err
    total = 2 * len(tile_grid(W, H, 64, 64))  # two slides at 1 um/px, 64-px tiles every 64 px
    lines = [line for line in err.splitlines() if line.startswith("tiling:")]
    assert lines and lines[-1].startswith(f"tiling: {total}/{total} grid tiles (100 %), ")
    assert "grid tiles/s" in lines[-1] and "\r" not in err
    assert tile_slides.main(base) == 0
    assert "tiling: 0/0 grid tiles" in capsys.readouterr().err  # both slides reused: nothing left to do


def test_help_shows_the_defaults_and_the_annotation_flags(capsys):
    with pytest.raises(SystemExit):
        tile_slides.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--tile TILE tile side in pixels at --mpp (default: 224)" in text
    assert "--annotations-map CSV" in text and "slide1.svs.geojson" in text and "Region*=ignore" in text
    assert "--out OUT shard folder to write (becomes data.root) --mpp" in text  # no "(default: None)"
