#!/usr/bin/env python
"""Contact sheet of synthetic patches: one row per variant, each patch beside its mask.

    python tools/synthetic_sheet.py --out variants.png                    # every variant
    python tools/synthetic_sheet.py --out v.png --variants default,pale --per-row 8

Patch i of every row comes from the same seed, split and index, so the rows show what each
variant changes on the same tissue layout (class-mix and size variants draw other layouts).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from mlps_dist.core.fileio import atomic_write_bytes  # noqa: E402
from mlps_dist.synthetic.options import VARIANTS, SyntheticOptionError, variant_options  # noqa: E402
from mlps_dist.synthetic.patches import PALETTE, make_sample  # noqa: E402

LABEL_WIDTH = 130
GAP = 4


def build_sheet(names: list[str], per_row: int, tile: int, seed: int, split: str) -> Image.Image:
    sheet = Image.new("RGB", (LABEL_WIDTH + per_row * 2 * (tile + GAP), len(names) * (tile + GAP)), "black")
    draw = ImageDraw.Draw(sheet)
    colours = np.array(PALETTE, np.uint8)
    for row, name in enumerate(names):
        options = variant_options(name)
        top = row * (tile + GAP)
        draw.text((4, top + tile // 2 - 6), f"{name} ({options.size} px)", fill="white")
        for col in range(per_row):
            _, rgb, mask = make_sample(seed, split, col, options=options)
            left = LABEL_WIDTH + col * 2 * (tile + GAP)
            sheet.paste(Image.fromarray(rgb).resize((tile, tile), Image.BILINEAR), (left, top))
            sheet.paste(Image.fromarray(colours[mask]).resize((tile, tile), Image.NEAREST), (left + tile + 2, top))
    return sheet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names (default: all)")
    p.add_argument("--per-row", type=int, default=5, help="patches per variant")
    p.add_argument("--tile", type=int, default=112, help="pixels per patch on the sheet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    try:
        sheet = build_sheet(names, args.per_row, args.tile, args.seed, args.split)
    except SyntheticOptionError as error:
        print(f"synthetic_sheet: {error}", file=sys.stderr)
        return 2
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out}: {len(names)} variants x {args.per_row} patches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
