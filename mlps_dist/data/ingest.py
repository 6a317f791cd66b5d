"""Conversion of a source dataset folder into shards (the engine of ``mlps shards``).

Two passes: ``check`` decodes every source file and collects every problem before anything
is written; ``write`` then writes the shards. Each shard is committed atomically
(ShardWriter), info.json is written last, and a rerun reuses the shards that already hold
exactly the planned samples made from source files with the same bytes (each shard's
``STEM.sources.json`` records every source's size, mtime_ns and sha256), so a killed
conversion finishes on the next run and a corrected image or mask is converted again.

Images that are RGBA, LA, greyscale or palettised are converted to RGB (alpha dropped) and
the sample's json records ``converted_from``. Masks are stored as 8-bit greyscale PNGs of
class indices 0..C-1 with C = ignore; palettised masks give their indices, RGB masks are
mapped through the dataset palette.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core import png
from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import atomic_write_json, sha256_file
from mlps_dist.core.progress import Progress
from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY, encode_rgb, format_info, image_member, split_image_format
from mlps_dist.data.layouts import Layout, SourceItem, scan_layout
from mlps_dist.data.shards import (
    FORMAT_VERSION,
    ShardError,
    ShardWriter,
    encode_labels,
    read_index,
    sample_key,
    shard_stem,
    shard_tmp_files,
    write_info,
)

CONVERTIBLE_MODES = ("RGBA", "LA", "L", "P")


class BadInput(MlpsError, ValueError):
    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass
class Checked:
    item: SourceItem
    labels: list[int]
    size: tuple[int, int]  # (H, W)
    converted_from: str = ""


@dataclass
class Plan:
    layout: Layout
    src: Path
    shard_size: int
    splits: dict[str, list[Checked]] = field(default_factory=dict)
    bad: list[tuple[Path, str]] = field(default_factory=list)


def _open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # forces a full decode: truncated files fail here, not in training
        return img
    except Exception as exc:  # PIL raises many types for broken files
        raise BadInput(path, f"unreadable or truncated image ({exc})") from exc


def _rgb(path: Path) -> tuple[Image.Image, str]:
    img = _open_image(path)
    if img.mode == "RGB":
        return img, ""
    if img.mode in CONVERTIBLE_MODES:
        return img.convert("RGB"), img.mode
    raise BadInput(path, f"image mode {img.mode} is not 8-bit RGB/RGBA/greyscale; convert it to RGB PNG")


def mask_indices(path: Path, layout: Layout) -> np.ndarray:
    img = _open_image(path)
    if img.mode in ("P", "L"):
        arr = np.asarray(img, dtype=np.uint8)
    elif img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        arr = np.full(code.shape, 255, dtype=np.uint8)
        for index, (r, g, b) in enumerate(layout.palette):
            arr[code == ((r << 16) | (g << 8) | b)] = index
        if (arr == 255).any():
            raise BadInput(path, f"RGB mask has colours outside the {layout.name} palette {layout.palette}")
    else:
        raise BadInput(path, f"mask mode {img.mode}: expected a palettised or greyscale PNG of class indices")
    if arr.max(initial=0) > layout.ignore_index:
        bad = sorted(set(np.unique(arr).tolist()) - set(range(layout.ignore_index + 1)))
        raise BadInput(
            path, f"mask values {bad} outside 0..{layout.ignore_index} ({layout.ignore_index} = ignore/white)"
        )
    return arr


def check_item(item: SourceItem, layout: Layout) -> Checked:
    img, converted = _rgb(item.image)
    size = (img.height, img.width)
    labels = item.labels
    if item.mask is not None:
        mask = mask_indices(item.mask, layout)
        if mask.shape != size:
            raise BadInput(
                item.mask,
                f"mask size {mask.shape[1]}x{mask.shape[0]} != image size {size[1]}x{size[0]} ({item.image.name})",
            )
        present = set(np.unique(mask).tolist())
        labels = [int(c in present) for c in range(layout.num_classes)]
    return Checked(item, labels, size, converted)


def _check_or_report(args):
    item, layout = args
    try:
        return check_item(item, layout)
    except BadInput as exc:
        return exc


def build_plan(layout: Layout, src: str | Path, shard_size: int, workers: int = 1, show_progress: bool = False) -> Plan:
    """Scan and decode every source file; problems are collected in ``plan.bad``.
    ``show_progress``: files checked / total on stderr (mlps_dist/core/progress.py)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    items, bad = scan_layout(layout, src)
    plan = Plan(layout, Path(src), shard_size, bad=list(bad))
    progress = Progress("check", sum(map(len, items.values())), "files", enabled=show_progress)
    for split, split_items in items.items():
        jobs = [(item, layout) for item in split_items]
        results = []
        if workers > 1 and len(jobs) > 64:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(_check_or_report, jobs, chunksize=64):
                    results.append(result)
                    progress.update()
        else:
            for job in jobs:
                results.append(_check_or_report(job))
                progress.update()
        plan.splits[split] = [r for r in results if isinstance(r, Checked)]
        plan.bad += [(r.path, r.problem) for r in results if isinstance(r, BadInput)]
    progress.close()
    return plan


# ---------------------------------------------------------------- writing


def sample_members(
    checked: Checked, plan: Plan, image_format: str = "png", quality: int = DEFAULT_JPEG_QUALITY
) -> dict[str, bytes]:
    item = checked.item
    if image_format == "png":
        raw = item.image.read_bytes()
        # Keep the source bytes when they already are an RGB PNG (bit-exact and no re-encode cost).
        if checked.converted_from or not raw.startswith(png.SIGNATURE):
            raw = png.encode(_rgb(item.image)[0])
    else:
        raw = encode_rgb(_rgb(item.image)[0], image_format, quality)
    meta = {"source": str(item.image.relative_to(plan.src)), "dataset": plan.layout.name, **item.meta}
    if checked.converted_from:
        meta["converted_from"] = checked.converted_from
    members = {
        image_member(image_format): raw,
        "labels": encode_labels(checked.labels),
        "json": json.dumps(meta).encode(),
    }
    if item.mask is not None:
        members["mask.png"] = png.encode_indices(mask_indices(item.mask, plan.layout))
    return members


def sources_file(root: Path, stem: str) -> Path:
    """``STEM.sources.json``: size, mtime_ns and sha256 of every source file of a shard."""
    return root / f"{stem}.sources.json"


def _file_stamp(path: Path | None) -> list | None:
    if path is None:
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, sha256_file(path)]


def source_record(chunk: list[Checked], src: Path) -> list[dict]:
    return [
        {
            "image": str(c.item.image.relative_to(src)),
            "image_stamp": _file_stamp(c.item.image),
            "mask_stamp": _file_stamp(c.item.mask),
        }
        for c in chunk
    ]


def _same_sources(recorded, chunk: list[Checked], src: Path) -> bool:
    """The recorded sources are the planned ones with the same bytes (size and sha256; the
    mtime is recorded for people, a file copied with its bytes unchanged is still the same)."""
    if not isinstance(recorded, list) or len(recorded) != len(chunk):
        return False
    for old, new in zip(recorded, source_record(chunk, src)):
        for kind in ("image_stamp", "mask_stamp"):
            a, b = old.get(kind) if isinstance(old, dict) else None, new[kind]
            if (a is None) != (b is None) or (b is not None and (a[0], a[2]) != (b[0], b[2])):
                return False
        if old.get("image") != new["image"]:
            return False
    return True


def _shard_is_complete(
    root: Path, split: str, number: int, chunk: list[Checked], first: int, src: Path, member: str = "png"
) -> bool:
    """True when the shard on disk holds exactly the planned samples, made from source files
    with the same bytes (from a previous run); a corrected image or mask redoes the shard."""
    stem = shard_stem(split, number)
    tar, idx = root / f"{stem}.tar", root / f"{stem}.idx"
    if not (tar.is_file() and idx.is_file()):
        return False
    try:
        if not _same_sources(json.loads(sources_file(root, stem).read_text()), chunk, src):
            return False
    except (OSError, ValueError, TypeError, IndexError):
        return False  # no record (an older release, or a kill before it was written): redo
    try:
        entries = read_index(idx)
    except ShardError:
        return False
    if [key for key, _ in entries] != [sample_key(split, first + i) for i in range(len(chunk))]:
        return False
    tar_size = tar.stat().st_size
    with open(tar, "rb") as f:
        for (_key, members), checked in zip(entries, chunk):
            if (
                any(off + size > tar_size for off, size in members.values())
                or "json" not in members
                or member not in members
            ):  # written with another --image-format
                return False
            f.seek(members["json"][0])
            meta = json.loads(f.read(members["json"][1]))
            if meta.get("source") != str(checked.item.image.relative_to(src)):
                return False
    return True


def write_plan(
    plan: Plan,
    out: str | Path,
    log=print,
    image_format: str = "png",
    image_quality: int = DEFAULT_JPEG_QUALITY,
    extra: dict | None = None,
    show_progress: bool = False,
) -> dict:
    """Shards of every split and info.json; ``image_format`` (encoding.py) applies to the
    training split; ``extra`` keys (e.g. ``mpp``) are added to info.json; ``show_progress``:
    samples written (or reused) / total on stderr."""
    image_member(image_format)  # unknown formats fail before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)  # the folder is incomplete until the end
    for stale in shard_tmp_files(out):  # a killed writer's temporary shards; no other .tmp file
        stale.unlink(missing_ok=True)
    info = {
        "format": FORMAT_VERSION,
        "layout": plan.layout.name,
        "classes": list(plan.layout.classes),
        "ignore_index": plan.layout.ignore_index,
        "palette": [list(c) for c in plan.layout.palette],
        "source": str(plan.src.resolve()),
        **(extra or {}),
        "splits": {},
    }
    progress = Progress("write", sum(map(len, plan.splits.values())), "samples", enabled=show_progress)
    for split, samples in plan.splits.items():
        shards, reused = [], 0
        fmt = split_image_format(image_format, split)
        for number, first in enumerate(range(0, len(samples), plan.shard_size)):
            chunk = samples[first : first + plan.shard_size]
            stem = shard_stem(split, number)
            if _shard_is_complete(out, split, number, chunk, first, plan.src, image_member(fmt)):
                shards.append({"tar": f"{stem}.tar", "idx": f"{stem}.idx", "count": len(chunk)})
                reused += 1
                progress.update(len(chunk))
                continue
            sources_file(out, stem).unlink(missing_ok=True)  # written again after the new tar
            writer = ShardWriter(out, split, number)
            try:
                for i, checked in enumerate(chunk):
                    writer.write(sample_key(split, first + i), sample_members(checked, plan, fmt, image_quality))
            except BaseException:
                writer.abort()
                raise
            shards.append(writer.close())
            atomic_write_json(sources_file(out, stem), source_record(chunk, plan.src), indent=None)
            progress.update(len(chunk))
        planned = {s["tar"] for s in shards} | {s["idx"] for s in shards}
        for old in list(out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")) + list(
            out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].idx")
        ):
            if old.name not in planned:  # left over from an earlier, larger conversion
                old.unlink()
                sources_file(out, old.name.rsplit(".", 1)[0]).unlink(missing_ok=True)
        sizes = {c.size for c in samples}
        info["splits"][split] = {
            "count": len(samples),
            "has_masks": split != "train",
            "image_size": list(sizes.pop()) if len(sizes) == 1 else None,
            **format_info(fmt, image_quality),
            "class_counts": [int(sum(c.labels[k] for c in samples)) for k in range(plan.layout.num_classes)],
            "shards": shards,
        }
        if reused:
            log(f"{split}: reused {reused} complete shard(s) from an earlier run")
    progress.close()
    write_info(out, info)
    return info


def summary_lines(info: dict) -> list[str]:
    lines = []
    for split, s in info["splits"].items():
        freq = ", ".join(f"{c}={n}" for c, n in zip(info["classes"], s["class_counts"]))
        lines.append(
            f"{split}: {s['count']} samples in {len(s['shards'])} shard(s); "
            f"image size {s['image_size']} ({s['image_format']}); samples per class: {freq}"
        )
    return lines


def bad_counter(bad: list[tuple[Path, str]]) -> Counter:
    return Counter(problem.split(" (")[0] for _, problem in bad)
