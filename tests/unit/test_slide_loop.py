"""The QuPath loop closed: slide -> segment_slides -> OUT/<slide>/regions.geojson ->
tile_slides (unchanged file, as NAME.EXT.geojson and through --annotations-map) -> shards
whose labels and masks match the synthetic slides' truth.

The model is slide_fixtures.ColourModel (nearest palette colour per pixel on flat-colour
slides): the map it stitches is the truth up to the map's 4 um/px, so what is measured
here is the round trip of the regions, not a model's accuracy."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import read_samples, segment  # noqa: E402

from mlps_dist.cli import tile as tile_slides  # noqa: E402
from mlps_dist.core.fileio import sha256_file  # noqa: E402
from mlps_dist.synthetic.patches import WHITE  # noqa: E402
from mlps_dist.synthetic.slides import truth_map, write_synthetic_slide  # noqa: E402

W, H, CELL = 768, 512, 200
LABEL_MIN = 0.05  # tile_slides' --label-min-fraction default


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two flat-colour slides (their truth regions) segmented by segment_slides."""
    root = tmp_path_factory.mktemp("loop")
    truth = {
        f"loop{i}": write_synthetic_slide(
            root / "slides" / f"loop{i}.tiff", None, W, H, seed=30 + i, cell_px=CELL, flat=True
        )
        for i in range(2)
    }
    assert segment(root, root / "maps") == 0
    return root, truth


def test_regions_geojson_tiles_into_labels_that_match_the_truth(maps, tmp_path):
    root, truth = maps
    regions = {name: root / "maps" / name / "regions.geojson" for name in truth}
    assert all(p.is_file() for p in regions.values())
    (tmp_path / "ann").mkdir()
    shutil.copy(regions["loop1"], tmp_path / "ann" / "loop1.tiff.geojson")  # QuPath's export name
    table = tmp_path / "annotations.csv"
    table.write_text(f"slide,annotations\nloop0,{regions['loop0']}\n")  # the file where segment_slides wrote it
    (tmp_path / "splits.csv").write_text("loop0,train\nloop1,val\n")
    out = tmp_path / "shards"
    assert (
        tile_slides.main(
            [
                "--slides",
                str(root / "slides"),
                "--out",
                str(out),
                "--mpp",
                "2",
                "--tile",
                "32",
                "--annotations",
                str(tmp_path / "ann"),
                "--annotations-map",
                str(table),
                "--splits",
                str(tmp_path / "splits.csv"),
            ]
        )
        == 0
    )
    info = json.loads((out / "info.json").read_text())
    assert info["annotations"]["loop1"]["sha256"] == sha256_file(regions["loop1"])
    assert info["annotations"]["loop0"]["sha256"] == sha256_file(regions["loop0"])
    assert set(info["annotations"]["loop0"]["classes"].values()) <= {"TE", "NEC", "LYM", "TAS"}

    # Train: each tile's label set against the classes covering >= LABEL_MIN of it in the truth.
    equal = tiles = 0
    for _, meta, sample in read_samples(out, "train"):
        fine = truth_map(truth["loop0"], meta["x"], meta["y"], meta["size0"], 64)
        cover = np.bincount(fine.ravel(), minlength=5)[:4] / fine.size
        labels = np.frombuffer(sample["labels"], np.uint8)
        equal += int((labels == (cover >= LABEL_MIN)).all())
        tiles += 1
    assert tiles >= 20 and equal / tiles >= 0.9, (equal, tiles)

    # Val: the masks against the truth, where both have a class.
    agree = annotated = tissue = covered = 0
    for _, meta, sample in read_samples(out, "val"):
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        expected = truth_map(truth["loop1"], meta["x"], meta["y"], meta["size0"], 32)
        both = (mask != 4) & (expected != WHITE)
        agree += (mask[both] == expected[both]).sum()
        annotated += both.sum()
        tissue += (expected != WHITE).sum()
        covered += ((expected != WHITE) & (mask != 4)).sum()
    assert annotated > 0 and agree / annotated >= 0.95 and covered / tissue >= 0.95, (agree, annotated, covered, tissue)
