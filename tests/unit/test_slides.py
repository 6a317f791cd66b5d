"""Whole slides: reader, tissue, annotations, tile_slides and segment_slides against the truth
of synthetic slides (pyramidal TIFFs written with tifffile, opened through OpenSlide)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_fixtures import CELL, ColourModel, H, W, read_samples, segment

from mlps_dist.core.errors import InputError
from mlps_dist.slides.reader import Slide
from mlps_dist.slides.tissue import detect_tissue
from mlps_dist.synthetic.patches import PALETTE, WHITE
from mlps_dist.synthetic.slides import CLASS_MAP, truth_map, write_synthetic_slide

REPO = Path(__file__).resolve().parents[2]


from mlps_dist.cli import tile as tile_slides  # noqa: E402


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three textured slides with annotations, and the truth regions of each."""
    root = tmp_path_factory.mktemp("wsi")
    truth = {}
    for i in range(3):
        name = f"slide{i}"
        truth[name] = write_synthetic_slide(
            root / "slides" / f"{name}.tiff", root / "ann" / f"{name}.geojson", W, H, seed=i, cell_px=CELL
        )
    return root, truth


def tile_args(root: Path, out: Path, *extra):
    return [
        "--slides",
        str(root / "slides"),
        "--out",
        str(out),
        "--mpp",
        "2",
        "--tile",
        "32",
        "--annotations",
        str(root / "ann"),
        "--class-map",
        CLASS_MAP,
        *extra,
    ]


def splits_csv(root: Path) -> Path:
    path = root / "splits.csv"
    path.write_text("slide,split\nslide0,train\nslide1,val\nslide2,test\n")
    return path


def test_reader_resamples_from_a_coarser_level_like_level_zero(slides):
    root, _ = slides
    with Slide(root / "slides" / "slide0.tiff") as slide:
        assert slide.mpp == pytest.approx(1.0) and len(slide.downsamples) >= 2
        assert slide.best_level(4.0) >= 1
        fast = slide.read(200, 100, 256, 64).astype(np.float32)  # from a reduced level
        full = Image.fromarray(slide.read(200, 100, 256, 256)).resize((64, 64), Image.Resampling.BOX)
        full = np.asarray(full, np.float32)
        assert np.abs(fast - full).mean() < 12  # fine texture: filters differ pixel by pixel
        blocks = lambda a: a.reshape(16, 4, 16, 4, 3).mean((1, 3))  # noqa: E731
        assert np.abs(blocks(fast) - blocks(full)).mean() < 3  # same place, same scale


def test_tissue_mask_matches_the_truth(slides):
    root, truth = slides
    with Slide(root / "slides" / "slide0.tiff") as slide:
        thumb = slide.read_scaled(8.0)
    mask = detect_tissue(thumb, 8.0)
    h, w = mask.shape
    expected = truth_map(truth["slide0"], 0, 0, w * 8, w, h, h * 8) != WHITE
    iou = (mask & expected).sum() / (mask | expected).sum()
    assert iou > 0.85


def test_tile_labels_and_masks_match_the_truth(slides, tmp_path):
    root, truth = slides
    out = tmp_path / "shards"
    assert tile_slides.main(tile_args(root, out, "--splits", str(splits_csv(root)))) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["mpp"] == 2.0 and info["splits"]["train"]["slides"] == ["slide0"]
    assert info["splits"]["val"]["slides"] == ["slide1"] and info["splits"]["val"]["has_masks"]
    assert (out / "tissue" / "slide0.png").is_file()
    trains = list(read_samples(out, "train"))
    assert len(trains) > 10
    for number, (key, meta, sample) in enumerate(trains):
        assert key == f"train_{number:08d}" and meta["slide"] == "slide0" and meta["tissue"] >= 0.5
        assert meta["size0"] == pytest.approx(64) and meta["mpp"] == 2.0
        fine = truth_map(truth["slide0"], meta["x"], meta["y"], meta["size0"], 64)
        cover = np.bincount(fine.ravel(), minlength=5)[:4] / fine.size
        labels = np.frombuffer(sample["labels"], np.uint8)
        assert all(labels[c] == 1 for c in range(4) if cover[c] >= 0.08), (meta, cover, labels)
        assert all(labels[c] == 0 for c in range(4) if cover[c] < 0.02), (meta, cover, labels)
    agree = total = 0
    for _, meta, sample in read_samples(out, "val"):
        mask = np.asarray(Image.open(__import__("io").BytesIO(sample["mask.png"])))
        expected = truth_map(truth["slide1"], meta["x"], meta["y"], meta["size0"], 32)
        annotated = mask != 4
        agree += (mask[annotated] == expected[annotated]).sum()
        total += annotated.sum()
        assert ((expected != WHITE) & ~annotated).mean() < 0.05  # no polygon lost
    assert total > 0 and agree / total > 0.97


def test_tile_slides_image_format_encodes_train_tiles_only(slides, tmp_path):
    """--image-format webp: train tiles are lossless WebP with the PNG run's pixels; val/test
    tiles and masks stay PNG, byte for byte."""
    from mlps_dist.data.decode import decode_rgb
    from mlps_dist.data.shards import open_split

    root, _ = slides
    outs = {fmt: tmp_path / fmt for fmt in ("png", "webp")}
    for fmt, out in outs.items():
        args = tile_args(root, out, "--splits", str(splits_csv(root)), "--image-format", fmt)
        assert tile_slides.main(args) == 0
    info = json.loads((outs["webp"] / "info.json").read_text())
    assert info["splits"]["train"]["image_format"] == "webp" and info["splits"]["val"]["image_format"] == "png"
    png, webp = open_split(outs["png"], "train"), open_split(outs["webp"], "train")
    assert len(png) == len(webp) > 10 and webp.image_member == "webp"
    for i in range(len(png)):
        assert webp.read(i)["image"][:4] == b"RIFF"
        np.testing.assert_array_equal(decode_rgb(webp.read(i)["image"]), decode_rgb(png.read(i)["image"]))
    for split in ("val", "test"):
        a, b = open_split(outs["png"], split), open_split(outs["webp"], split)
        assert [a.read(i) for i in range(len(a))] == [b.read(i) for i in range(len(b))]


def test_an_unmapped_annotation_name_is_refused_with_the_names_found(slides, tmp_path):
    root, _ = slides
    ann = tmp_path / "ann"
    shutil.copytree(root / "ann", ann)
    data = json.loads((ann / "slide1.geojson").read_text())
    data["features"][0]["properties"]["classification"]["name"] = "Fat"
    (ann / "slide1.geojson").write_text(json.dumps(data))
    args = tile_args(root, tmp_path / "out")
    args[args.index("--annotations") + 1] = str(ann)
    with pytest.raises(InputError, match="Fat.*names found"):
        tile_slides._main(args)
    assert not (tmp_path / "out" / "info.json").exists()


def test_a_slide_without_mpp_is_refused_by_name(slides, tmp_path):
    root, _ = slides
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(root / "slides" / "slide0.tiff", folder)
    write_synthetic_slide(folder / "nompp.tiff", None, 512, 384, seed=5, mpp=None, cell_px=CELL)
    with pytest.raises(InputError, match="nompp"):
        tile_slides._main(["--slides", str(folder), "--out", str(tmp_path / "out"), "--mpp", "2", "--tile", "32"])
    assert not (tmp_path / "out").exists()
    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.deploy import segment_slides

    args = segment_cmd.parse_args(["--run", "x", "--slides", str(folder), "--out", str(tmp_path / "maps")])
    with pytest.raises(InputError, match="nompp"):
        segment_slides.run(args, model=ColourModel())


def test_a_truncated_slide_is_named_and_the_others_are_written(slides, tmp_path):
    root, _ = slides
    folder = tmp_path / "slides"
    shutil.copytree(root / "slides", folder)
    data = (folder / "slide2.tiff").read_bytes()
    (folder / "slide2.tiff").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    args = tile_args(root, out, "--splits", str(splits_csv(root)))
    args[args.index("--slides") + 1] = str(folder)
    assert tile_slides.main(args) == 2
    info = json.loads((out / "info.json").read_text())
    assert any("slide2" in p for p in info["bad_slides"])
    assert info["splits"]["train"]["count"] > 0 and info["splits"]["val"]["count"] > 0
    assert "test" not in info["splits"]
    maps = tmp_path / "maps"
    assert segment(tmp_path, maps) == 3  # some slides failed, the others are written (2: a bad invocation)
    assert (maps / "slide0" / "summary.json").is_file() and (maps / "slide1" / "summary.json").is_file()
    assert not (maps / "slide2").exists()
    row = [r for r in (maps / "summary.csv").read_text().splitlines() if r.startswith("slide2,")][0]
    assert ",failed," in row and "slide2" in row


# ---------------------------------------------------------------- segment_slides


@pytest.fixture(scope="module")
def flat_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    truth = {
        f"flat{i}": write_synthetic_slide(
            root / "slides" / f"flat{i}.tiff", None, W, H, seed=10 + i, cell_px=CELL, flat=True
        )
        for i in range(2)
    }
    return root, truth


def test_stitched_map_matches_the_truth(flat_slides, tmp_path):
    import openslide

    root, truth = flat_slides
    out = tmp_path / "maps"
    assert segment(root, out) == 0
    for name, regions in truth.items():
        classes = np.asarray(Image.open(out / name / "classes.png"))
        h, w = classes.shape
        assert (w, h) == (W // 4, H // 4)
        expected = truth_map(regions, 0, 0, W, w, h, H)
        inner = expected != WHITE
        assert (classes[inner] == expected[inner]).mean() > 0.97
        assert (classes[~inner] == 4).mean() > 0.97  # glass is the ignore index
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["map_mpp"] == 4.0 and summary["mpp"] == pytest.approx(1.0)
        true_mm2 = sum(p.area for _, p in regions) * 1e-6
        assert summary["tissue_mm2"] == pytest.approx(true_mm2, rel=0.05)
        for c, cls in enumerate(ColourModel.classes):
            area = sum(p.area for k, p in regions if k == c) * 1e-6
            assert summary["area_mm2"][cls] == pytest.approx(area, rel=0.1, abs=0.01)
        tiff = openslide.OpenSlide(str(out / name / "classes.tiff"))
        assert tiff.dimensions == (w, h) and float(tiff.properties["openslide.mpp-x"]) == pytest.approx(4.0)
        rgb = np.asarray(tiff.read_region((0, 0), 0, (w, h)).convert("RGB"))
        assert (rgb == np.asarray(PALETTE, np.uint8)[classes]).all()
        assert (out / name / "overlay.png").is_file()
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok," in r for r in rows[1:])
    # Resume: a slide whose folder exists is not redone; a missing one is, identically.
    kept = (out / "flat0" / "summary.json").stat().st_mtime_ns
    before = (out / "flat1" / "classes.png").read_bytes()
    shutil.rmtree(out / "flat1")
    assert segment(root, out) == 0
    assert (out / "flat0" / "summary.json").stat().st_mtime_ns == kept
    assert (out / "flat1" / "classes.png").read_bytes() == before
    assert not (out / ".work" / "flat1").exists()


def test_segment_slides_with_a_trained_run_needs_its_mpp(flat_slides, tmp_path):
    from trained_runs import make_run

    from mlps_dist.cli import segment as segment_cmd

    run = make_run(tmp_path / "run")
    base = [
        "--run",
        str(run),
        "--slides",
        str(flat_slides[0] / "slides" / "flat0.tiff"),
        "--out",
        str(tmp_path / "m"),
        "--map-mpp",
        "8",
        "--stride",
        "32",
    ]
    with pytest.raises(InputError, match="--model-mpp"):
        segment_cmd._main(base)
    assert segment_cmd.main(base + ["--model-mpp", "8"]) == 0
    classes = np.asarray(Image.open(tmp_path / "m" / "flat0" / "classes.png"))
    assert classes.shape == (H // 8, W // 8) and set(np.unique(classes)) <= set(range(5))
    assert (classes == 4).any() and (classes < 4).any()


def test_make_shards_records_the_mpp(tmp_path):
    from mlps_dist.synthetic.patches import write_luad_layout

    write_luad_layout(tmp_path / "luad", train=4, val=2, test=2, size=32)
    from mlps_dist.cli import shards as make_shards

    assert (
        make_shards.main(
            ["--layout", "luad", "--src", str(tmp_path / "luad"), "--out", str(tmp_path / "s"), "--mpp", "0.5"]
        )
        == 0
    )
    assert json.loads((tmp_path / "s" / "info.json").read_text())["mpp"] == 0.5


def test_share_ranges_cover_every_tile_once():
    from mlps_dist.deploy.segment_slides import share_ranges

    counts = [5, 0, 7, 1]
    for world in (1, 2, 3, 5):
        seen = [(s, i) for pieces in share_ranges(counts, world) for s, a, b in pieces for i in range(a, b)]
        assert sorted(seen) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
