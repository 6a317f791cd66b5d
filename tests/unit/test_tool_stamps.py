"""The tools reuse earlier work only when its inputs' bytes and every shaping setting match:
make_shards shards, tile_slides parts, segment_slides maps."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
from PIL import Image

from mlps_dist.cli import shards as make_shards  # noqa: E402


def test_make_shards_converts_a_corrected_source_again(tmp_path):
    from mlps_dist.data.shards import open_split
    from mlps_dist.synthetic.patches import write_luad_layout

    src = tmp_path / "src"
    write_luad_layout(src, train=6, val=3, test=3, size=32)
    out = tmp_path / "shards"
    assert make_shards.main(["--layout", "luad", "--src", str(src), "--out", str(out)]) == 0
    mask_path = sorted((src / "val" / "mask").glob("*.png"))[0]
    with Image.open(mask_path) as im:
        fixed = Image.fromarray(np.zeros_like(np.asarray(im)), im.mode)
        if im.mode == "P":
            fixed.putpalette(im.getpalette())
    fixed.save(mask_path)  # corrected under the same name
    before = (out / "train-000000.tar").stat().st_mtime_ns
    assert make_shards.main(["--layout", "luad", "--src", str(src), "--out", str(out)]) == 0
    reader = open_split(out, "val")
    index = [i for i in range(len(reader)) if json.loads(reader.read(i)["json"])["source"].endswith(mask_path.name)]
    stored = np.asarray(Image.open(io.BytesIO(reader.read(index[0] if index else 0)["mask.png"])))
    assert set(np.unique(stored).tolist()) == {0}
    assert (out / "train-000000.tar").stat().st_mtime_ns == before  # untouched sources: reused
    record = json.loads((out / "val-000000.sources.json").read_text())
    assert all(len(r["image_stamp"]) == 3 and len(r["mask_stamp"]) == 3 for r in record)


def test_segment_slides_redoes_a_slide_made_with_other_settings(tmp_path):
    from slide_fixtures import ColourModel

    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.deploy import segment_slides
    from mlps_dist.slides.workkey import key_digest, work_key
    from mlps_dist.synthetic.slides import write_synthetic_slide

    slide = tmp_path / "slides" / "s0.tiff"
    write_synthetic_slide(slide, None, 384, 256, seed=4, cell_px=100, flat=True)
    out = tmp_path / "maps"

    def segment(*extra, model=None):
        args = segment_cmd.parse_args(["--run", "unused", "--slides", str(slide.parent), "--out", str(out), *extra])
        return segment_slides.run(args, model=model or ColourModel())

    assert segment("--map-mpp", "4") == 0
    assert json.loads((out / "s0" / "summary.json").read_text())["map_mpp"] == 4.0
    assert segment("--map-mpp", "8") == 0  # not "done": made at another map resolution
    summary = json.loads((out / "s0" / "summary.json").read_text())
    assert summary["map_mpp"] == 8.0 and Image.open(out / "s0" / "classes.png").size == (384 // 8, 256 // 8)
    kept = (out / "s0" / "summary.json").stat().st_mtime_ns
    assert segment("--map-mpp", "8") == 0 and (out / "s0" / "summary.json").stat().st_mtime_ns == kept

    class OtherModel(ColourModel):
        fingerprint = "another model"

    assert segment("--map-mpp", "8", model=OtherModel()) == 0
    assert (out / "s0" / "summary.json").stat().st_mtime_ns != kept
    # A run killed after the tissue pass at 8 um/px, rerun at 4 um/px: the work is redone.
    stride = ColourModel.patch_size // 2
    settings = {
        "map_mpp": 8.0,
        "slide_mpp": None,
        "stride": stride,
        "patch_size": 32,
        "model_mpp": 2.0,
        "classes": ColourModel.classes,
    }
    shutil.rmtree(out / "s0")
    segment_slides.prepare_slide(slide, out, 8.0, None, key_digest(work_key(slide, settings, "ColourModel")))
    assert (out / ".work" / "s0" / "meta.json").is_file()
    assert segment("--map-mpp", "4") == 0
    assert Image.open(out / "s0" / "classes.png").size == (384 // 4, 256 // 4)


def test_tile_slides_redoes_a_part_when_the_annotations_change(tmp_path):
    from mlps_dist.data.shards import open_split
    from mlps_dist.synthetic.slides import CLASS_MAP, write_synthetic_slide

    root = tmp_path / "wsi"
    write_synthetic_slide(root / "slides" / "s0.tiff", root / "ann" / "s0.geojson", 384, 256, seed=5, cell_px=100)
    from mlps_dist.cli import tile as tile_slides

    base = [
        "--slides",
        str(root / "slides"),
        "--out",
        str(tmp_path / "t"),
        "--mpp",
        "2",
        "--tile",
        "32",
        "--annotations",
        str(root / "ann"),
        "--class-map",
        CLASS_MAP,
        "--split-ratios",
        "1,0,0",
        "--keep-parts",
    ]
    assert tile_slides.main(base) == 0
    first = len(open_split(tmp_path / "t", "train"))
    geo = json.loads((root / "ann" / "s0.geojson").read_text())
    geo["features"] = geo["features"][:1]  # a corrected annotation: most regions removed
    (root / "ann" / "s0.geojson").write_text(json.dumps(geo))
    assert tile_slides.main(base) == 0
    assert len(open_split(tmp_path / "t", "train")) < first
