"""``mlps inspect``: what a shard folder holds; optionally a few samples as PNG files.

mlps inspect data/demo/shards
mlps inspect data/demo/shards --dump 4 --split val --out /tmp/peek
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlps_dist.cli import parser

HELP = "summarise a shard folder (classes, splits, samples per class); --dump writes samples as PNG"


def describe(root: Path) -> list[str]:
    import numpy as np

    from mlps_dist.data.shards import open_split, read_info

    info = read_info(root)
    lines = [f"{root}: layout {info['layout']}, classes {info['classes']}, ignore index {info['ignore_index']}"]
    for split, s in info["splits"].items():
        reader = open_split(root, split)  # also checks every index against info.json
        counts = np.zeros(reader.num_classes, dtype=np.int64)
        for i in range(len(reader)):
            counts += reader.labels(i).astype(np.int64)
        per_class = ", ".join(f"{c}={n}" for c, n in zip(reader.classes, counts.tolist()))
        lines.append(
            f"  {split}: {len(reader)} samples, {len(s['shards'])} shard(s), image size {s['image_size']}, "
            f"masks: {'yes' if reader.has_masks else 'no'}; samples per class: {per_class}"
        )
    return lines


def dump(root: Path, split: str, count: int, to: Path) -> None:
    import io

    from PIL import Image

    from mlps_dist.core.fileio import atomic_open, atomic_write_bytes, atomic_write_text
    from mlps_dist.data.shards import open_split, sample_key

    reader = open_split(root, split)
    palette = [v for colour in reader.info["palette"] for v in colour]
    to.mkdir(parents=True, exist_ok=True)
    for i in range(min(count, len(reader))):
        sample, key = reader.read(i), sample_key(split, i)  # the file name never comes from the shard
        atomic_write_bytes(to / f"{key}.{reader.image_member}", sample["image"])
        meta = {**json.loads(sample["json"]), "labels": reader.labels(i).astype(int).tolist()}
        atomic_write_text(to / f"{key}.json", json.dumps(meta))
        if "mask.png" in sample:  # palettised copy, so the classes are visible
            mask = Image.open(io.BytesIO(sample["mask.png"])).convert("P")
            mask.putpalette(palette)
            with atomic_open(to / f"{key}.mask.png") as f:
                mask.save(f, format="PNG")
    print(f"wrote {min(count, len(reader))} sample(s) of {split} to {to}")


def build_parser():
    p = parser("inspect", HELP)
    p.add_argument("root", help="shard folder (written by mlps shards or mlps tile)")
    p.add_argument("--dump", type=int, default=0, help="write this many samples as PNG (+ json, mask)")
    p.add_argument("--split", default="train", help="split the samples are dumped from")
    p.add_argument("--out", default="shard_samples", help="folder the dumped samples are written to")
    return p


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.data.shards import ShardError

    args = build_parser().parse_args(argv)
    try:
        print("\n".join(describe(Path(args.root))))
        if args.dump:
            dump(Path(args.root), args.split, args.dump, Path(args.out))
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
