"""The tools reuse earlier work only when its inputs' bytes and every shaping setting match:
make_shards shards, tile_slides parts, segment_slides maps."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_slides import load_tool  # noqa: E402

make_shards = load_tool("make_shards")


def test_make_shards_converts_a_corrected_source_again(tmp_path):
    from mlps_dist.data.shards import open_split
    from mlps_dist.data.synthetic import write_luad_layout

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
