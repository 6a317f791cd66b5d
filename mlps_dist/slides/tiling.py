"""Slides -> training tiles: the per-slide work of mlps tile and the final assembly.

Per slide (one process, any rank): tissue mask at ``tissue_mpp`` (also written as
OUT/tissue/<slide>.png), a grid of ``tile`` px tiles every ``stride`` px at the target
``mpp``, tiles with tissue >= ``min_tissue`` kept; with annotations, a train tile is
labelled with every class covering >= ``label_min_fraction`` of it (tiles with no class are
unlabelled and left out) and a val/test tile carries the rasterised polygons as its mask
(tiles no polygon touches are left out). The slide's tiles go into one part tar
(OUT/.parts/<slide>-000000.tar + .idx, local keys) committed atomically, then
OUT/.parts/<slide>.json, the marker that the slide is done. A rerun skips done slides
whose marker has the same settings (the class map included), split, slide file (size,
mtime) and annotation file (name, size, sha256).

Assembly renumbers the parts into the shard format of mlps shards: per split, the
slides in name order, keys ``<split>_<index:08d>`` contiguous whatever order the slides
finished in. Members are copied byte for byte (no re-encoding); output shards are split
over ranks, each written by exactly one. Train tiles are stored in ``image_format`` (PNG by
default; WebP or JPEG decode faster, see data/encoding.py), val/test tiles and masks as PNG.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core import png
from mlps_dist.core.fileio import atomic_write_bytes, atomic_write_json
from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY, encode_rgb, format_info, image_member, split_image_format
from mlps_dist.data.shards import (
    FORMAT_VERSION,
    ShardWriter,
    TarFiles,
    encode_labels,
    read_index,
    sample_key,
    shard_stem,
    write_info,
)
from mlps_dist.slides.class_map import ClassMap, as_class_map
from mlps_dist.slides.grid import rank_share, tile_grid
from mlps_dist.slides.reader import Slide, slide_stem
from mlps_dist.slides.tissue import TissueMap, detect_tissue

PARTS = ".parts"


@dataclass
class TileSpec:
    mpp: float
    tile: int
    stride: int
    min_tissue: float
    classes: list[str]
    class_map: ClassMap | dict = field(default_factory=dict)  # slides/class_map.py (a dict: exact names only)
    label_min_fraction: float = 0.05
    tissue_mpp: float = 8.0
    slide_mpp: float | None = None  # level-0 MPP override for every slide
    image_format: str = "png"  # encoding of the train tiles (data/encoding.py); val/test and masks stay PNG
    image_quality: int = DEFAULT_JPEG_QUALITY  # JPEG only

    @property
    def ignore_index(self) -> int:
        return len(self.classes)


@dataclass
class SlideJob:
    path: str
    split: str
    annotations: str | None  # annotation file (GeoJSON, ImageScope or ASAP XML)


def part_marker(out: Path, name: str) -> Path:
    return out / PARTS / f"{name}.json"


def finished_part(job: SlideJob, spec: TileSpec, out: str | Path, inputs: dict | None = None) -> dict | None:
    """The record of the slide's part when an earlier run finished it under the same key
    (``inputs``: the slide's _input_key when the caller has it, so the files are hashed once)."""
    marker = part_marker(Path(out), slide_stem(job.path))
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # unreadable: redo the slide
    if (
        record.get("split") == job.split
        and record.get("spec") == _spec_key(spec)
        and record.get("inputs") == (inputs if inputs is not None else _input_key(job))
    ):
        return {**record, "reused": True}
    return None


def grid_size(width: int, height: int, slide_mpp: float, spec: TileSpec) -> int:
    """Grid positions of a slide (what progress counts: glass positions pass quickly)."""
    return len(tile_grid(width, height, spec.tile * spec.mpp / slide_mpp, spec.stride * spec.mpp / slide_mpp))


def tile_slide(job: SlideJob, spec: TileSpec, out: str | Path, on_tiles=None) -> dict:
    """Tile one slide into its part; returns the part record (also written as the marker).
    ``on_tiles(n)``: called as grid positions are done (in batches), for progress."""
    from mlps_dist.slides.annotations import load_annotations

    out = Path(out)
    name = slide_stem(job.path)
    marker = part_marker(out, name)
    inputs = _input_key(job)
    done = finished_part(job, spec, out, inputs)
    if done is not None:
        return done
    report = on_tiles or (lambda n: None)
    with Slide(job.path, spec.slide_mpp) as slide:
        annotations = (
            load_annotations(job.annotations, spec.classes, spec.class_map, bounds=(slide.width, slide.height))
            if job.annotations
            else None
        )
        tissue = TissueMap(detect_tissue(slide.read_scaled(spec.tissue_mpp), spec.tissue_mpp), spec.tissue_mpp)
        atomic_write_bytes(out / "tissue" / f"{name}.png", tissue.png_bytes())
        size0 = spec.tile * spec.mpp / slide.mpp
        stride0 = spec.stride * spec.mpp / slide.mpp
        writer = ShardWriter(out / PARTS, name, 0)
        labels_out, count, pending = [], 0, 0
        try:
            for x, y in tile_grid(slide.width, slide.height, size0, stride0):
                pending += 1
                if pending == 64:
                    report(pending)
                    pending = 0
                frac = tissue.fraction(x, y, size0, slide.mpp)
                if frac < spec.min_tissue:
                    continue
                meta = {
                    "slide": name,
                    "x": x,
                    "y": y,
                    "size0": round(size0, 4),
                    "mpp": spec.mpp,
                    "tissue": round(frac, 4),
                    "split": job.split,
                }
                members = {}
                labels = [0] * len(spec.classes)
                if annotations is not None:
                    cover = annotations.coverage(x, y, size0)
                    if job.split == "train":
                        labels = [int(c >= spec.label_min_fraction) for c in cover]
                        if not any(labels):
                            continue  # no annotated class here: unlabelled, not negative
                        meta["coverage"] = {c: round(float(v), 4) for c, v in zip(spec.classes, cover) if v > 0}
                    else:
                        if cover.sum() <= 0:
                            continue
                        mask = annotations.rasterise(x, y, size0, spec.tile, spec.ignore_index)
                        present = set(np.unique(mask).tolist())
                        labels = [int(c in present) for c in range(len(spec.classes))]
                        members["mask.png"] = png.encode_indices(mask)
                rgb = slide.read(x, y, size0, spec.tile)
                fmt = split_image_format(spec.image_format, job.split)
                image = png.encode(rgb) if fmt == "png" else encode_rgb(Image.fromarray(rgb), fmt, spec.image_quality)
                members[image_member(fmt)] = image
                members.update(labels=encode_labels(labels), json=json.dumps(meta).encode())
                writer.write(f"t_{count:08d}", members)
                labels_out.append(labels)
                count += 1
        except BaseException:
            writer.abort()
            raise
        part = writer.close()
        report(pending)
    record = {
        "slide": name,
        "path": str(job.path),
        "split": job.split,
        "count": count,
        "part": part,
        "labels": labels_out,
        "width": slide.width,
        "height": slide.height,
        "slide_mpp": slide.mpp,
        "spec": _spec_key(spec),
        "inputs": inputs,
    }
    if annotations is not None:
        record["annotations"] = {
            "file": str(job.annotations),
            "sha256": inputs["annotations"]["sha256"],
            "classes": annotations.mapping,
        }
    atomic_write_json(marker, record, indent=None)
    return record


def _input_key(job: SlideJob) -> dict:
    """The slide file's size and mtime and the annotation file's name, size and sha256: a
    re-scanned slide, a corrected annotation or another file chosen redoes the slide's part."""
    from mlps_dist.slides.workkey import content_stamp, slide_stamp

    annotations = None
    if job.annotations is not None:
        size, digest = content_stamp(job.annotations)
        annotations = {"file": Path(job.annotations).name, "size": size, "sha256": digest}
    return json.loads(json.dumps({"slide": slide_stamp(job.path), "annotations": annotations}))


def _spec_key(spec: TileSpec) -> dict:
    """What a finished part depends on: a rerun with other settings redoes the slide."""
    return json.loads(json.dumps(asdict(spec)))


# ---------------------------------------------------------------- assembly


def assembly_plan(records: list[dict], shard_size: int) -> dict[str, list[list[tuple[str, int]]]]:
    """{split: [shard: [(slide, local index)]]}: slides in name order, shards of shard_size."""
    plan: dict[str, list[list[tuple[str, int]]]] = {}
    for split in sorted({r["split"] for r in records}):
        samples = [
            (r["slide"], i)
            for r in sorted(records, key=lambda r: r["slide"])
            if r["split"] == split
            for i in range(r["count"])
        ]
        plan[split] = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    return plan


def write_assigned_shards(out: str | Path, records: list[dict], shard_size: int, world: int, rank: int) -> None:
    """Write this rank's share of the output shards (copying members from the parts)."""
    out = Path(out)
    plan = assembly_plan(records, shard_size)
    jobs = [
        (split, number, first)
        for split, shards in plan.items()
        for number, first in zip(range(len(shards)), np.cumsum([0] + [len(s) for s in shards[:-1]]))
    ]
    files, entries = TarFiles(), {}
    try:
        for split, number, first in rank_share(jobs, world, rank):
            writer = ShardWriter(out, split, number)
            try:
                for offset, (slide, local) in enumerate(plan[split][number]):
                    if slide not in entries:
                        entries[slide] = read_index(out / PARTS / f"{shard_stem(slide, 0)}.idx")
                    tar = out / PARTS / f"{shard_stem(slide, 0)}.tar"
                    members = {ext: files.read(tar, off, size) for ext, (off, size) in entries[slide][local][1].items()}
                    writer.write(sample_key(split, int(first) + offset), members)
            except BaseException:
                writer.abort()
                raise
            writer.close()
    finally:
        files.close()


def write_slide_info(
    out: str | Path, records: list[dict], spec: TileSpec, palette, shard_size: int, extra: dict | None = None
) -> dict:
    out = Path(out)
    plan = assembly_plan(records, shard_size)
    info = {
        "format": FORMAT_VERSION,
        "layout": "slides",
        "classes": list(spec.classes),
        "ignore_index": spec.ignore_index,
        "palette": [list(c) for c in palette],
        "mpp": spec.mpp,
        "tile": spec.tile,
        "stride": spec.stride,
        "min_tissue": spec.min_tissue,
        "label_min_fraction": spec.label_min_fraction,
        "class_map": as_class_map(spec.class_map, spec.classes).record(),
        "annotations": {
            r["slide"]: r["annotations"] for r in sorted(records, key=lambda r: r["slide"]) if r.get("annotations")
        },
        "splits": {},
        **(extra or {}),
    }
    for split, shards in plan.items():
        mine = [r for r in records if r["split"] == split]
        counts = np.zeros(len(spec.classes), np.int64)
        for r in mine:
            if r["labels"]:
                counts += np.asarray(r["labels"], np.int64).sum(axis=0)
        info["splits"][split] = {
            "count": sum(len(s) for s in shards),
            "has_masks": split != "train",
            "image_size": [spec.tile, spec.tile],
            **format_info(split_image_format(spec.image_format, split), spec.image_quality),
            "class_counts": [int(v) for v in counts],
            "slides": sorted(r["slide"] for r in mine),
            "shards": [
                {"tar": f"{shard_stem(split, n)}.tar", "idx": f"{shard_stem(split, n)}.idx", "count": len(s)}
                for n, s in enumerate(shards)
            ],
        }
    write_info(out, info)
    return info


def remove_stale_shards(out: Path, records: list[dict], shard_size: int) -> None:
    """Shards of an earlier, different assembly (info.json is absent while assembling), and
    the temporary files of shards: only files the ledger (OUT/.mlps-written.json) says this
    tool wrote, so nothing of anyone else's in ``out`` is touched. The new shards are added
    to the ledger before they are written."""
    from mlps_dist.core.toolout import Ledger
    from mlps_dist.data.shards import shard_tmp_files

    plan = assembly_plan(records, shard_size)
    keep = {
        f"{shard_stem(split, n)}.{ext}"
        for split, shards in plan.items()
        for n in range(len(shards))
        for ext in ("tar", "idx")
    }
    ledger = Ledger(out)
    stems = {name.rsplit(".", 1)[0] for name in ledger.names() | keep}
    ledger.remove_except(keep)
    for tmp in shard_tmp_files(out, stems):
        tmp.unlink(missing_ok=True)
    ledger.add(keep)


def remove_parts(out: Path) -> None:
    shutil.rmtree(Path(out) / PARTS, ignore_errors=True)
