"""mlps mosaics on real tissue (tests/data/kather2016_mini): layout, exact masks,
splits by source image, labels, determinism, resume, bad inputs, the stain change."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlps_dist.data.layouts import LUAD, scan_layout
from mlps_dist.synthetic import mosaic_tiles, mosaics
from mlps_dist.synthetic.mosaic_tiles import LUAD_CLASSES, parse_classes
from mlps_dist.synthetic.mosaics import IGNORE, dihedral, white_pixels

REPO = Path(__file__).resolve().parents[2]
MINI = REPO / "tests" / "data" / "kather2016_mini"
FOLDERS = {0: "TUM", 1: "DEB", 2: "LYM", 3: "STR"}
PINNED = ["--split-by-source", "--sources-train", "01", "--sources-val", "04", "--sources-test", "05"]
COUNTS = ["--train", "16", "--val", "6", "--test", "6"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


from mlps_dist.cli import mosaics as TOOL  # noqa: E402
from mlps_dist.cli import shards as shards_cmd  # noqa: E402


def _run(*argv) -> int:
    return TOOL.main([str(a) for a in argv])


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaics") / "raw"
    assert _run("--tiles", MINI, "--out", out, *COUNTS, *PINNED, "--seed", "5", "--workers", "1") == 0
    return out


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _split_tiles(out: Path) -> dict:
    return json.loads((out / "mosaics.json").read_text())["params"]["splits"]


def test_layout_accepted_by_make_shards(made, tmp_path):
    items, bad = scan_layout(LUAD, made)
    assert not bad and [len(items[s]) for s in ("train", "val", "test")] == [16, 6, 6]
    for item in items["train"]:
        assert re.fullmatch(r".+-\d+-\d+-\[[01] [01] [01] [01]\]\.png", item.image.name)
    for split in ("val", "test"):
        mask = Image.open(items[split][0].mask)
        assert mask.mode == "P" and mask.size == (150, 150)
    assert (
        shards_cmd.main(["--layout", "luad", "--src", str(made), "--out", str(tmp_path / "shards"), "--mpp", "0.495"])
        == 0
    )
    info = json.loads((tmp_path / "shards" / "info.json").read_text())
    assert info["classes"] == list(LUAD_CLASSES) and info["ignore_index"] == IGNORE
    assert info["mpp"] == 0.495


def test_masks_exact_regions_are_transformed_tiles(made):
    """Every pixel of a class region is that pixel of one transformed tile of the class from
    the patch's own source image; ignore = glass (a transformed glass tile) or white."""
    tiles = _split_tiles(made)
    glass = json.loads((made / "mosaics.json").read_text())["params"]["glass"]
    for split in ("val", "test"):
        for img_path in sorted((made / split / "img").iterdir()):
            rgb, mask = _rgb(img_path), np.asarray(Image.open(made / split / "mask" / img_path.name))
            source = img_path.name.rsplit("-", 2)[0]
            assert source in tiles[split]
            for c in np.unique(mask[mask != IGNORE]):
                where = mask == c
                candidates = [
                    dihedral(_rgb(MINI / rel), k) for rel in tiles[split][source][LUAD_CLASSES[c]] for k in range(8)
                ]
                assert any(np.array_equal(t[where], rgb[where]) for t in candidates), (img_path.name, c)
                assert not white_pixels(rgb[where][None]).any()
            ignored = mask == IGNORE
            not_white = ignored & ~white_pixels(rgb)
            if not_white.any():  # these pixels must be glass: one transformed glass tile
                candidates = [dihedral(_rgb(MINI / rel), k) for rel in glass[split] for k in range(8)]
                assert any(np.array_equal(t[not_white], rgb[not_white]) for t in candidates), img_path.name


def test_no_source_image_in_two_splits(made):
    record = json.loads((made / "sources.json").read_text())
    assert record["split_by"] == "source"
    sources = {s: set(r["sources"]) for s, r in record["splits"].items()}
    assert sources == {"train": {"CRC-Prim-HE-01"}, "val": {"CRC-Prim-HE-04"}, "test": {"CRC-Prim-HE-05"}}
    for split, folder in (("train", made / "train"), ("val", made / "val" / "img"), ("test", made / "test" / "img")):
        names = {p.name.split("-[")[0].rsplit("-", 2)[0] for p in folder.iterdir()}
        assert names <= sources[split]
    glass = json.loads((made / "mosaics.json").read_text())["params"]["glass"]
    assert not set(glass["train"]) & set(glass["val"]) and not set(glass["val"]) & set(glass["test"])
    assert record["splits"]["val"]["tiles"]["NEC"] == {"CRC-Prim-HE-04": 3}


def test_labels_are_the_classes_of_the_mask(made):
    """The name's label equals the drawn mask's classes, and each covers >= min_share of the
    non-ignored pixels (redrawn here from the same generator the tool used)."""
    params = json.loads((made / "mosaics.json").read_text())["params"]
    catalogue = mosaic_tiles.scan_tiles(MINI, FOLDERS, "BACK")
    plan = mosaic_tiles.split_by_source(
        catalogue, {"train": 16, "val": 6, "test": 6}, 5, {"train": ["01"], "val": ["04"], "test": ["05"]}
    )
    options = mosaics.MosaicOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in params["options"].items()})
    mosaics._init(str(MINI), plan, options, 5, str(made))
    names = {p.name.split("-[")[0]: p.name for p in (made / "train").iterdir()}
    sizes = set()
    for index in range(16):
        stem, rgb, mask = mosaics.sample(5, "train", index, plan, options)
        assert np.array_equal(_rgb(made / "train" / names[stem]), rgb)
        labels = [int(d) for d in names[stem].rsplit("-[", 1)[1][:-5].split()]
        assert labels == mosaics.labels_of(mask)
        counts = np.bincount(mask.ravel(), minlength=IGNORE + 1)
        valid = counts[:IGNORE].sum()
        assert all(counts[c] >= options.min_share * valid for c in range(IGNORE) if labels[c])
        sizes.add(sum(labels))
    assert 1 in sizes and len(sizes) >= 2  # single-class patches and mixed ones


def test_same_bytes_for_any_workers_and_after_interruption(made, tmp_path):
    other = tmp_path / "w2"
    assert _run("--tiles", MINI, "--out", other, *COUNTS, *PINNED, "--seed", "5", "--workers", "2") == 0
    assert _files(made) == _files(other)
    assert all(filecmp.cmp(made / f, other / f, shallow=False) for f in _files(made))
    victims = sorted((other / "val" / "mask").iterdir())[:2] + sorted((other / "train").iterdir())[:3]
    for path in victims:
        path.unlink()
    (other / "mosaics.json").write_text(
        json.dumps({**json.loads((other / "mosaics.json").read_text()), "complete": False})
    )
    assert _run("--tiles", MINI, "--out", other, *COUNTS, *PINNED, "--seed", "5", "--workers", "1") == 0
    assert all(filecmp.cmp(made / f, other / f, shallow=False) for f in _files(made))
    third = tmp_path / "seed6"
    assert _run("--tiles", MINI, "--out", third, *COUNTS, *PINNED, "--seed", "6", "--workers", "1") == 0
    assert not filecmp.cmp(
        sorted((made / "val" / "img").iterdir())[0], sorted((third / "val" / "img").iterdir())[0], shallow=False
    )


def test_tool_script_writes_what_the_command_writes(made, tmp_path):
    """python tools/make_mosaics.py with the documented flags, in its own process: the same files."""
    out = tmp_path / "tool"
    argv = ["--tiles", MINI, "--out", out, "--classes", "TE=TUM,NEC=DEB,LYM=LYM,TAS=STR", "--background", "BACK"]
    argv += [*COUNTS, *PINNED, "--seed", "5", "--workers", "1"]
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_mosaics.py"), *map(str, argv)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert _files(made) == _files(out)
    assert all(filecmp.cmp(made / f, out / f, shallow=False) for f in _files(made) if f != "mosaics.json")


def test_stain_change_changes_val_and_test_only(made, tmp_path):
    out = tmp_path / "stain"
    assert _run("--tiles", MINI, "--out", out, *COUNTS, *PINNED, "--seed", "5", "--workers", "1", "--stain-change") == 0
    for f in _files(made / "train"):
        assert filecmp.cmp(made / "train" / f, out / "train" / f, shallow=False)
    for split in ("val", "test"):
        for name in _files(made / split / "mask"):
            assert filecmp.cmp(made / split / "mask" / name, out / split / "mask" / name, shallow=False)
            before, after = _rgb(made / split / "img" / name), _rgb(out / split / "img" / name)
            od = lambda x: -np.log(np.maximum(x, 1) / 255.0).sum(-1).mean()  # noqa: E731
            assert od(after) < 0.8 * od(before)
    assert _run("--tiles", MINI, "--out", out, *COUNTS, *PINNED, "--seed", "5") == 2  # other settings: refused


def test_default_regex_and_csv_name_sources(tmp_path):
    name, _ = mosaic_tiles.source_namer(None, None)
    assert name("TUM/10F32_CRC-Prim-HE-03_012_Row_1_Col_301.png") == "CRC-Prim-HE-03"
    assert name("LYM/14AF3_CRC-Prim-HE-01b_Row_301_Col_301.png") == "CRC-Prim-HE-01"
    assert name("ADI-AAAWMSFI.tif") is None
    rows = ["file,source"] + [
        f"{p.relative_to(MINI).as_posix()},{'A' if '-01_' in p.name else 'B'}"
        for f in FOLDERS.values()
        for p in sorted((MINI / f).iterdir())
    ]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    catalogue = mosaic_tiles.scan_tiles(MINI, FOLDERS, "BACK", source_csv=tmp_path / "s.csv", require_sources=True)
    assert catalogue.sources() == ["A", "B"]
    assert sum(len(v) for v in catalogue.tiles[0].values()) == 9


def test_unpinned_split_by_source_gives_each_split_its_own_images():
    catalogue = mosaic_tiles.scan_tiles(MINI, FOLDERS, "BACK", require_sources=True)
    for seed in range(3):
        plan = mosaic_tiles.split_by_source(catalogue, {"train": 5, "val": 1, "test": 1}, seed)
        sources = [set(plan.tiles[s]) for s in ("train", "val", "test")]
        assert sorted(x for part in sources for x in part) == ["CRC-Prim-HE-01", "CRC-Prim-HE-04", "CRC-Prim-HE-05"]
        assert all(len(part) == 1 for part in sources)
        assert all(set(next(iter(plan.tiles[s].values()))) == {0, 1, 2, 3} for s in ("train", "val", "test"))


def test_split_by_tile_keeps_tiles_apart():
    catalogue = mosaic_tiles.scan_tiles(MINI, FOLDERS, "BACK")
    plan = mosaic_tiles.split_by_tile(catalogue, {"train": 5, "val": 1, "test": 1}, 0)
    seen: dict[str, str] = {}
    for split, per_source in plan.tiles.items():
        for per_class in per_source.values():
            for rels in per_class.values():
                for rel in rels:
                    assert seen.setdefault(rel, split) == split
    assert len(seen) == 36


def test_grey_matches_the_pipeline():
    import torch

    from mlps_dist.method.cam import grey_levels

    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    expected = grey_levels(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0].numpy()
    assert np.array_equal(mosaics.grey_levels(rgb), expected)


def _tiles_copy(tmp_path: Path) -> Path:
    root = tmp_path / "tiles"
    shutil.copytree(MINI, root)
    return root


def _bad(capsys, *argv) -> str:
    assert _run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert "--tiles" in _bad(capsys, "--tiles", tmp_path / "nope", "--out", out)
    assert "unknown class name 'TUMOR'" in _bad(capsys, "--tiles", MINI, "--out", out, "--classes", "TUMOR=TUM")
    assert "no folder" in _bad(capsys, "--tiles", MINI, "--out", out, "--classes", "TE=ADI")
    root = _tiles_copy(tmp_path)
    (root / "EMPTY").mkdir()
    assert "too few tiles" in _bad(capsys, "--tiles", root, "--out", out, "--classes", "TE=EMPTY")
    line = _bad(
        capsys,
        "--tiles",
        MINI,
        "--out",
        out,
        *COUNTS,
        "--split-by-source",
        "--sources-test",
        "01",
        "--sources-val",
        "04",
        "--sources-train",
        "01",
    )
    assert "CRC-Prim-HE-01" in line and "one split only" in line
    for path in sorted((root / "DEB").glob("*CRC-Prim-HE-05_*")):
        path.unlink()
    line = _bad(capsys, "--tiles", root, "--out", out, *COUNTS, *PINNED)
    assert "class NEC" in line and "--sources-test" in line and "DEB" in line
    broken = root / "TUM" / "FFFF_CRC-Prim-HE-04_001_Row_1_Col_1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert str(broken) in _bad(capsys, "--tiles", root, "--out", out, *COUNTS)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert "not empty" in _bad(capsys, "--tiles", MINI, "--out", foreign, *COUNTS)
    assert not out.exists()  # nothing written by a refused call
    line = _bad(capsys, "--tiles", MINI, "--out", out, *COUNTS, "--split-by-source", "--sources-val", "04")
    assert "--sources-test" in line and "no pinned source image" in line
    assert parse_classes("TUM,DEB") == {0: "TUM", 1: "DEB"}
    assert parse_classes("NEC=DEB,TE=TUM") == {0: "TUM", 1: "DEB"}


def test_variant_harness_builds_the_real_variants_data(tmp_path):
    """tools/demo_variants.py --data-only: real and real-stain from --tiles, split by source
    image (train 01, val 04, test 05 here), shards at 0.495 um/px; no training."""
    harness = _tool("demo_variants")
    common = [
        "--tiles",
        str(MINI),
        "--real-counts",
        "6,2,2",
        "--real-sources",
        "01/04/05",
        "--data",
        str(tmp_path / "data"),
        "--runs",
        str(tmp_path / "runs"),
        "--data-only",
    ]
    assert harness.main(["--real", *common]) == 0
    for name in ("real", "real-stain"):
        data = tmp_path / "data" / f"{name}-01r04v05t-s0"
        info = json.loads((data / "shards" / "info.json").read_text())
        assert info["mpp"] == 0.495 and info["layout"] == "luad"
        record = json.loads((data / "raw" / "sources.json").read_text())
        assert {s: r["sources"] for s, r in record["splits"].items()} == {
            "train": ["CRC-Prim-HE-01"],
            "val": ["CRC-Prim-HE-04"],
            "test": ["CRC-Prim-HE-05"],
        }
    plain, stained = (tmp_path / "data" / f"{n}-01r04v05t-s0" / "raw" for n in ("real", "real-stain"))
    assert _files(plain / "train") == _files(stained / "train")
    assert not filecmp.cmp(
        sorted((plain / "test" / "img").iterdir())[0], sorted((stained / "test" / "img").iterdir())[0], shallow=False
    )
    args = harness.parse_args(["--variants", "real", "--tiles", str(MINI), "--swap-val-test"])
    assert harness.run_name(args, "real") == "real-05v04t" and harness.role("real", args) == "held-out"
    assert args.real_sources == (["01", "02", "03"], ["05"], ["04"])
    default = harness.parse_args(["--variants", "real-stain", "--tiles", str(MINI)])
    assert harness.run_name(default, "real-stain") == "real-stain" and harness.role("real-stain", default) == "tuning"
    assert harness.background_enabled("real", "auto", False) is True
    assert harness.settings(default, "real-stain")["real_counts"] == [600, 40, 80]
    assert "real_counts" not in harness.settings(default, "pale")
