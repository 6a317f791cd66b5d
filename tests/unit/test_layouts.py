"""Dataset layouts: file-name label parsing and folder discovery for LUAD-HistoSeg and BCSS-WSSS."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from mlps_dist.data.ingest import build_plan
from mlps_dist.data.layouts import BCSS, LUAD, LayoutError, create_layout, scan_layout


def test_luad_name_with_spaces_gives_labels_and_coordinates():
    labels, meta = LUAD.parse_train_name("1031280-2300-27920-[1 0 0 1].png", 4)
    assert labels == [1, 0, 0, 1]
    assert meta == {"slide": "1031280", "x": 2300, "y": 27920}


def test_luad_slide_id_may_contain_dashes():
    labels, meta = LUAD.parse_train_name("A-17-0023-448-1344-[0 1 1 0].png", 4)
    assert labels == [0, 1, 1, 0]
    assert meta == {"slide": "A-17-0023", "x": 448, "y": 1344}


@pytest.mark.parametrize(
    "name, problem",
    [
        ("1031280-2300-27920-[1 0 1].png", "3 classes"),
        ("1031280-2300-27920-[1 0 2 1].png", "0 or 1"),
        ("1031280-2300-27920.png", "does not look like"),
    ],
)
def test_luad_bad_names_are_rejected_with_the_reason(name, problem):
    with pytest.raises(LayoutError, match=problem):
        LUAD.parse_train_name(name, 4)


def test_bcss_name_gives_labels_slide_and_region_origin():
    name = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png"
    labels, meta = BCSS.parse_train_name(name, 4)
    assert labels == [1, 1, 0, 1]
    assert meta == {"slide": "TCGA-A1-A0SK-DX1", "x": 45749, "y": 25055, "patch": 0}
    labels, meta = BCSS.parse_train_name("TCGA-E2-A1B6-DX1_xmin1_ymin2_MPP-0.2500+17[0010].png", 4)
    assert labels == [0, 0, 1, 0] and meta["patch"] == 17


def test_bcss_wrong_class_count_is_rejected():
    with pytest.raises(LayoutError, match="5 classes"):
        BCSS.parse_train_name("TCGA-A1_xmin1_ymin2+0[11010].png", 4)


def test_unknown_layout_lists_the_choices():
    with pytest.raises(LayoutError, match="bcss"):
        create_layout("camelyon")


def test_luad_training_folder_name_is_accepted(tiny_luad_folder, tmp_path):
    src = tmp_path / "luad"
    shutil.copytree(tiny_luad_folder, src)
    (src / "train").rename(src / "training")
    items, bad = scan_layout(LUAD, src)
    assert not bad
    assert len(items["train"]) == 32 and len(items["val"]) == 8 and len(items["test"]) == 8
    (src / "train").mkdir()
    with pytest.raises(LayoutError, match="keep one training folder"):
        scan_layout(LUAD, src)


def _bcss_folder(root, rng):
    """Four BCSS-named training patches and two val patches with RGB-palette masks."""
    names = [
        "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png",
        "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+1[0010].png",
        "TCGA-E2-A1B6-DX1_xmin100_ymin200_MPP-0.2500+0[0110].png",
        "TCGA-E2-A1B6-DX1_xmin100_ymin200_MPP-0.2500+5[1000].png",
    ]
    (root / "training").mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "training" / name)
    masks = []
    for split in ("val",):
        (root / split / "img").mkdir(parents=True)
        (root / split / "mask").mkdir(parents=True)
        for i in range(2):
            name = f"TCGA-BH-A0BG-DX1_xmin{i}_ymin7_MPP-0.2500.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / "img" / name)
            idx = rng.integers(0, 5, (16, 16)).astype(np.uint8)
            idx[0, 0] = 2
            colours = np.array(BCSS.palette, dtype=np.uint8)[idx]
            Image.fromarray(colours).save(root / split / "mask" / name)  # RGB colours, not indices
            masks.append(idx)
    return names, masks


def test_bcss_folder_is_scanned_and_rgb_masks_map_through_the_palette(tmp_path):
    names, masks = _bcss_folder(tmp_path / "BCSS-WSSS", np.random.default_rng(0))
    plan = build_plan(BCSS, tmp_path / "BCSS-WSSS", shard_size=8)
    assert not plan.bad
    assert [c.item.image.name for c in plan.splits["train"]] == sorted(names)
    assert plan.splits["train"][0].labels == [1, 1, 0, 1]
    from mlps_dist.data.ingest import mask_indices

    for checked, expected in zip(plan.splits["val"], masks):
        np.testing.assert_array_equal(mask_indices(checked.item.mask, BCSS), expected)
        assert checked.labels == [int((expected == c).any()) for c in range(4)]
        assert checked.item.meta["slide"] == "TCGA-BH-A0BG-DX1"
