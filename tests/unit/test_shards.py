"""Shard format and conversion: bit-exact round trip, DALI index, bad input, crash and rerun."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image
from tool_runs import run_tool

from mlps_dist.data import ingest
from mlps_dist.data.decode import decode_indices, decode_rgb
from mlps_dist.data.ingest import build_plan, write_plan
from mlps_dist.data.layouts import LUAD
from mlps_dist.data.shards import ShardError, open_split, read_index, read_info


def _sources(folder, split):
    if split == "train":
        return sorted((folder / "train").glob("*.png"))
    return sorted((folder / split / "img").glob("*.png"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_images_masks_and_labels_round_trip_bit_exact(tiny_luad_folder, tiny_shards, split):
    reader = open_split(tiny_shards, split)
    sources = _sources(tiny_luad_folder, split)
    assert len(reader) == len(sources) > 0
    for i, path in enumerate(sources):
        sample = reader.read(i)
        assert reader.key(i) == f"{split}_{i:08d}"
        np.testing.assert_array_equal(decode_rgb(sample["png"]), np.asarray(Image.open(path).convert("RGB")))
        meta = json.loads(sample["json"])
        assert meta["source"] == str(path.relative_to(tiny_luad_folder)) and meta["dataset"] == "luad"
        labels = list(np.frombuffer(sample["labels"], np.uint8))
        if split == "train":
            assert "mask.png" not in sample
            assert labels == LUAD.parse_train_name(path.name, 4)[0]
            assert meta["slide"] == path.name.split("-")[0]
        else:
            source_mask = np.asarray(Image.open(tiny_luad_folder / split / "mask" / path.name))
            stored = decode_indices(sample["mask.png"])
            assert Image.open(__import__("io").BytesIO(sample["mask.png"])).mode == "L"
            np.testing.assert_array_equal(stored, source_mask)
            assert labels == [int((source_mask == c).any()) for c in range(4)]
    assert reader.has_masks == (split != "train")


def test_info_and_dali_index_describe_the_tars(tiny_shards):
    info = read_info(tiny_shards)
    assert info["classes"] == ["TE", "NEC", "LYM", "TAS"] and info["ignore_index"] == 4
    assert len(info["palette"]) == 5 and info["palette"][-1] == [255, 255, 255]
    train = info["splits"]["train"]
    assert [s["count"] for s in train["shards"]] == [10, 10, 10, 2] and train["image_size"] == [48, 48]
    for shard in train["shards"]:
        first_line = (tiny_shards / shard["idx"]).read_text().splitlines()[0]
        assert first_line == f"v1.2 {shard['count']}"
        entries = read_index(tiny_shards / shard["idx"])
        raw = (tiny_shards / shard["tar"]).read_bytes()
        with tarfile.open(tiny_shards / shard["tar"]) as tar:
            for key, members in entries:
                for ext, (offset, size) in members.items():
                    assert raw[offset : offset + size] == tar.extractfile(f"{key}.{ext}").read()


def test_missing_info_json_or_split_is_named(tmp_path, tiny_shards):
    with pytest.raises(ShardError, match="info.json does not exist.*mlps shards"):
        read_info(tmp_path)
    with pytest.raises(ShardError, match="no split 'valid'"):
        open_split(tiny_shards, "valid")
    # Shards of a release that did not record the split's encoding: refused, naming the file.
    shutil.copytree(tiny_shards, tmp_path / "old")
    info = read_info(tmp_path / "old")
    del info["splits"]["train"]["image_format"]
    (tmp_path / "old" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match=r"old/info.json: split 'train' records no image_format.*mlps shards"):
        open_split(tmp_path / "old", "train")


def test_reader_survives_pickling_into_another_process(tiny_shards):
    import pickle

    reader = open_split(tiny_shards, "val")
    first = reader.read(0)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(0) == first and clone.read(7) == reader.read(7)


def test_threads_sharing_one_reader_get_the_right_bytes(tiny_shards):
    """A loader's prefetch thread reads through the same reader as the training thread (and
    DALI's source callback as its caller): interleaved reads must not move each other's place."""
    from concurrent.futures import ThreadPoolExecutor

    reader = open_split(tiny_shards, "train")
    expected = [open_split(tiny_shards, "train").read(i) for i in range(len(reader))]
    order = np.random.default_rng(0).integers(0, len(reader), size=4000)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(reader.read, order.tolist()))
    bad = [int(i) for i, sample in zip(order, got) if sample != expected[int(i)]]
    assert not bad, f"{len(bad)} of {len(order)} concurrent reads returned other bytes"
    reader.close()
    assert reader.read(1) == expected[1]  # a closed reader reopens on the next read


def _read_in_child(reader, index, queue):
    queue.put(reader.read(index))
    reader.close()  # the child's own descriptors; the parent's stay open


def test_forked_child_reads_with_its_own_descriptors(tiny_shards):
    import multiprocessing

    reader = open_split(tiny_shards, "train")
    first = reader.read(0)  # the parent has a descriptor open before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, 5, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == reader.read(5) and reader.read(0) == first


# ---------------------------------------------------------------- bad input


def _copy(folder, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(folder, dst)
    return dst


def _break(src, kind):
    """Make one file bad in the way named by ``kind``; returns that file."""
    train = sorted((src / "train").glob("*.png"))
    val = sorted((src / "val" / "img").glob("*.png"))
    if kind == "truncated":
        data = train[3].read_bytes()
        train[3].write_bytes(data[: len(data) // 2])
        return train[3]
    if kind == "label count":
        return train[4].rename(train[4].with_name(train[4].name.replace("[", "[1 ")))
    if kind == "mask missing":
        (src / "val" / "mask" / val[1].name).unlink()
        return val[1]
    if kind == "mask size":
        mask = src / "val" / "mask" / val[2].name
        Image.open(mask).resize((40, 48)).save(mask)
        return mask
    if kind == "mask values":
        mask = src / "val" / "mask" / val[3].name
        img = Image.open(mask)
        arr = np.asarray(img).copy()
        arr[0, 0] = 7
        out = Image.fromarray(arr, mode="P")
        out.putpalette(img.getpalette())
        out.save(mask)
        return mask
    raise AssertionError(kind)


PROBLEMS = {
    "truncated": "unreadable or truncated",
    "label count": "5 classes",
    "mask missing": "mask missing",
    "mask size": "mask size 40x48 != image size 48x48",
    "mask values": r"mask values \[7\] outside 0..4",
}


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_each_bad_input_is_reported_with_file_and_problem(tiny_luad_folder, tmp_path, kind):
    src = _copy(tiny_luad_folder, tmp_path)
    bad_file = _break(src, kind)
    plan = build_plan(LUAD, src, shard_size=10)
    assert len(plan.bad) == 1
    path, problem = plan.bad[0]
    assert path.name == bad_file.name
    assert __import__("re").search(PROBLEMS[kind], problem), problem


def test_cli_stops_before_writing_and_skip_bad_lists_and_counts(tiny_luad_folder, tmp_path):
    src = _copy(tiny_luad_folder, tmp_path)
    broken = [_break(src, "truncated"), _break(src, "mask values")]
    out = tmp_path / "shards"
    result = run_tool("-m", "mlps_dist", "shards", "--layout", "luad", "--src", str(src), "--out", str(out))
    assert result.returncode == 2
    for path in broken:
        assert path.name in result.stderr
    assert "2 bad file(s) found" in result.stderr and "--skip-bad" in result.stderr
    assert not out.exists() or not any(out.iterdir())

    result = run_tool(
        "-m",
        "mlps_dist",
        "shards",
        "--layout",
        "luad",
        "--src",
        str(src),
        "--out",
        str(out),
        "--skip-bad",
        "--shard-size",
        "8",
    )
    assert result.returncode == 0, result.stderr
    assert "2 bad file(s) skipped" in result.stderr and broken[0].name in result.stderr
    info = read_info(out)
    assert info["splits"]["train"]["count"] == 31 and info["splits"]["val"]["count"] == 7
    assert "train: 31 samples in 4 shard(s)" in result.stdout


def test_rgba_and_grey_images_are_converted_to_rgb(tiny_luad_folder, tmp_path):
    src = _copy(tiny_luad_folder, tmp_path)
    train = sorted((src / "train").glob("*.png"))
    rgb0, rgb1 = (np.asarray(Image.open(p).convert("RGB")) for p in train[:2])
    Image.open(train[0]).convert("RGBA").save(train[0])
    Image.open(train[1]).convert("L").save(train[1])
    plan = build_plan(LUAD, src, shard_size=40)
    assert not plan.bad
    write_plan(plan, tmp_path / "out", log=lambda *_: None)
    reader = open_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(decode_rgb(reader.read(0)["png"]), rgb0)
    assert json.loads(reader.read(0)["json"])["converted_from"] == "RGBA"
    grey = decode_rgb(reader.read(1)["png"])
    assert (grey[..., 0] == grey[..., 2]).all() and json.loads(reader.read(1)["json"])["converted_from"] == "L"


# ---------------------------------------------------------------- crash and rerun


def _tree(folder):
    """The shard files (not the output-folder mark make_shards leaves, outdirs.MARKER)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".mlps-output"}


def test_interrupted_conversion_finishes_on_rerun_identically(tiny_luad_folder, tiny_shards, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    plan = build_plan(LUAD, tiny_luad_folder, shard_size=10)
    real, calls = ingest.sample_members, []

    def dies_in_second_shard(checked, plan, *encoding):
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt  # as a kill would, in the middle of a shard
        return real(checked, plan, *encoding)

    monkeypatch.setattr(ingest, "sample_members", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write_plan(plan, out, log=lambda *_: None)
    monkeypatch.setattr(ingest, "sample_members", real)
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.idx",
        "train-000000.sources.json",
        "train-000000.tar",
    ]

    # A second kind of leftover: a tar renamed but its index not yet, and a stray .tmp.
    (out / "train-000001.tar").write_bytes(b"partial")
    (out / "train-000002.tar.tmp").write_bytes(b"partial")
    messages = []
    write_plan(build_plan(LUAD, tiny_luad_folder, shard_size=10), out, log=messages.append)
    assert messages == ["train: reused 1 complete shard(s) from an earlier run"]
    assert _tree(out) == _tree(tiny_shards)


def test_rerun_after_truncated_shard_rewrites_it(tiny_luad_folder, tiny_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    tar = out / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    (out / "info.json").unlink()
    (out / ".mlps-output").write_text("make_shards\n")  # a killed make_shards leaves its mark first
    result = run_tool(
        "-m",
        "mlps_dist",
        "shards",
        "--layout",
        "luad",
        "--src",
        str(tiny_luad_folder),
        "--out",
        str(out),
        "--shard-size",
        "10",
    )
    assert result.returncode == 0, result.stderr
    assert "train: reused 3 complete shard(s)" in result.stdout
    info_a, info_b = read_info(out), read_info(tiny_shards)
    info_a.pop("source"), info_b.pop("source")
    assert info_a == info_b
    assert _tree(out).keys() == _tree(tiny_shards).keys()
    assert (out / "train-000002.tar").read_bytes() == (tiny_shards / "train-000002.tar").read_bytes()


def test_inspect_shards_prints_counts_and_dumps_samples(tiny_shards, tmp_path):
    result = run_tool(
        "-m", "mlps_dist", "inspect", str(tiny_shards), "--dump", "2", "--split", "val", "--out", str(tmp_path / "dump")
    )
    assert result.returncode == 0, result.stderr
    info = read_info(tiny_shards)
    counts = ", ".join(f"{c}={n}" for c, n in zip(info["classes"], info["splits"]["val"]["class_counts"]))
    assert "val: 8 samples, 1 shard(s)" in result.stdout and counts in result.stdout
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == [
        "val_00000000.json",
        "val_00000000.mask.png",
        "val_00000000.png",
        "val_00000001.json",
        "val_00000001.mask.png",
        "val_00000001.png",
    ]
    assert Image.open(tmp_path / "dump" / "val_00000000.mask.png").mode == "P"


def test_image_formats_for_the_training_split(tiny_luad_folder, tmp_path):
    """--image-format: WebP keeps the pixels, JPEG comes close; val/test and masks stay PNG;
    a rerun with another format rewrites the shards instead of reusing them."""
    from mlps_dist.data.decode import decode_rgb
    from mlps_dist.data.ingest import build_plan, write_plan
    from mlps_dist.data.layouts import LUAD
    from mlps_dist.data.shards import open_split

    plan = build_plan(LUAD, tiny_luad_folder, shard_size=10)
    write_plan(plan, tmp_path / "png", log=lambda *_: None)
    png = open_split(tmp_path / "png", "train")
    out = tmp_path / "other"
    for fmt, member, tolerance in (("webp", "webp", 0.0), ("jpeg", "jpg", 4.0)):
        info = write_plan(plan, out, log=lambda *_: None, image_format=fmt)
        assert info["splits"]["train"]["image_format"] == fmt and info["splits"]["val"]["image_format"] == "png"
        reader = open_split(out, "train")
        assert reader.image_member == member and member in reader.read(0) and "png" not in reader.read(0)
        for i in range(len(reader)):
            diff = np.abs(decode_rgb(reader.read(i)["image"]).astype(int) - decode_rgb(png.read(i)["image"]))
            assert diff.mean() <= tolerance
        assert "mask.png" in open_split(out, "val").read(0)


def test_fast_png_decoder_matches_pil_and_leaves_other_modes_to_pil(monkeypatch):
    """8-bit RGB images and 8-bit greyscale masks go through imagecodecs (libpng); palette,
    alpha and 16-bit fall back to PIL (palette masks keep their indices), and so does a
    machine without imagecodecs: pixels and class indices never depend on the decoder."""
    import io as _io

    from mlps_dist.data import decode

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    indices = rng.integers(0, 5, (20, 24), dtype=np.uint8)
    palette_mask = Image.fromarray(indices)
    palette_mask.putpalette([v for i in range(256) for v in (i * 40 % 256, 255 - i, 7)])
    images = {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).quantize(16),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }

    def encoded(img):
        buf = _io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    for mode, img in images.items():
        png = encoded(img)
        expected = np.asarray(Image.open(_io.BytesIO(png)).convert("RGB"))
        assert (decode._fast_png(png, decode._PNG_RGB) is not None) == (mode == "RGB"), mode
        assert (decode._fast_png(png, decode._PNG_GREY) is not None) == (mode == "L"), mode
        np.testing.assert_array_equal(decode.decode_rgb(png), expected, err_msg=mode)
        resized = np.asarray(Image.open(_io.BytesIO(png)).convert("RGB").resize((12, 12), Image.BILINEAR))
        np.testing.assert_array_equal(decode.decode_rgb(png, size=12), resized, err_msg=mode)
    masks = {"L": encoded(Image.fromarray(indices)), "P": encoded(palette_mask)}
    for mode, png in masks.items():
        np.testing.assert_array_equal(decode.decode_indices(png), indices, err_msg=mode)
        nearest = np.asarray(Image.fromarray(indices).resize((12, 12), Image.NEAREST))
        np.testing.assert_array_equal(decode.decode_indices(png, size=12), nearest, err_msg=mode)
    with pytest.raises(ValueError, match="mode RGB"):
        decode.decode_indices(encoded(images["RGB"]))
    monkeypatch.setattr(decode, "imagecodecs", None)
    np.testing.assert_array_equal(decode.decode_rgb(png_rgb := encoded(images["RGB"])), rgb)
    assert decode._fast_png(png_rgb, decode._PNG_RGB) is None
    for png in masks.values():
        np.testing.assert_array_equal(decode.decode_indices(png), indices)


def test_the_tar_writer_writes_what_webdataset_writes():
    """Shards and mask chunks are written without webdataset, byte for byte as it would."""
    import io

    wds = pytest.importorskip("webdataset")
    from mlps_dist.data.tarwriter import TarWriter

    samples = [
        {
            "__key__": f"train/{i:04d}",
            "png": bytes(range(i % 256)) * 7,
            "cls": b"\x01\x00",
            "mask.png": b"m" * (600 + i),
            "txt": "ünï".encode(),
        }
        for i in range(5)
    ]
    samples.append({"__key__": "train/" + "long_name_" * 12, "png": b"x" * 513})  # a name over 100 bytes
    ours, theirs = io.BytesIO(), io.BytesIO()
    a, b = TarWriter(ours, mtime=0), wds.TarWriter(theirs, encoder=False, mtime=0, format="GNU_FORMAT")
    for sample in samples:
        assert a.write(sample) == b.write(sample)
    a.close()
    b.close()
    assert ours.getvalue() == theirs.getvalue()


def test_a_pseudo_mask_chunk_keeps_its_format(tmp_path):
    """Pseudo-mask chunks are ShardWriter tars whose members carry the float mtime 0.0 (a pax
    record each), as every mask pass has written them: the same bytes, and what a reader sees."""
    import hashlib

    from mlps_dist.data.pseudo_masks import committed_chunks, write_chunk

    layers = ["b4_5", "bn7"]
    samples = [(f"train_{i:08d}", [bytes([i, k]) * (100 + i) for k in range(2)]) for i in range(4, 8)]
    tar = write_chunk(tmp_path, 1, samples, layers, skipped={"train_00000005": "bad"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "masks-000001.idx",
        "masks-000001.skipped.json",
        "masks-000001.tar",
    ]  # no temporary file left
    assert committed_chunks(tmp_path) == {1}
    with tarfile.open(tar) as f:
        members = f.getmembers()
        assert [m.name for m in members] == [f"train_{i:08d}.{layer}.png" for i in range(4, 8) for layer in layers]
        assert all(
            m.pax_headers == {"mtime": "0.0"} and m.mode == 0o444 and m.uname == m.gname == "bigdata" for m in members
        )
        assert f.extractfile(members[3]).read() == samples[1][1][1]
    entries = read_index(tmp_path / "masks-000001.idx")
    assert entries[0] == ("train_00000004", {"b4_5.png": (1536, 208), "bn7.png": (3584, 208)})
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in tmp_path.iterdir()}
    assert digests == {
        "masks-000001.tar": "3f00ad8ebb5c0d8a",
        "masks-000001.idx": "81ac7516f583ff53",
        "masks-000001.skipped.json": "2335fe8a5156727b",
    }
