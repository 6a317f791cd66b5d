"""Convert a LUAD-HistoSeg or BCSS-WSSS folder into shards (see docs/architecture.md).

    python tools/make_shards.py --layout luad --src data/LUAD-HistoSeg --out data/luad/shards
    python tools/make_shards.py ... --image-format jpeg --image-quality 95   # faster training input

Every source file is decoded and checked before anything is written; problems are listed
with the file and what is wrong, and the conversion stops (exit 2) unless --skip-bad is
given, in which case the bad files are listed, counted and left out. Shards are committed
atomically and info.json is written last: after a crash, rerun the same command and it
finishes the job, reusing the shards that are already complete.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY, IMAGE_FORMATS  # noqa: E402
from mlps_dist.data.ingest import bad_counter, build_plan, summary_lines, write_plan  # noqa: E402
from mlps_dist.data.layouts import create_layout  # noqa: E402
from mlps_dist.core import runner  # noqa: E402
from mlps_dist.core.errors import InputError, MlpsError  # noqa: E402
from mlps_dist.core.outdirs import check_not_overlapping  # noqa: E402
from mlps_dist.core.toolout import tool_output  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", required=True, choices=["luad", "bcss"])
    p.add_argument("--src", required=True, help="dataset folder (holds train/ or training/, val/, test/)")
    p.add_argument("--out", required=True, help="shard folder to write (becomes data.root)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad files (listed) instead of stopping")
    p.add_argument("--allow-mixed-sizes", action="store_true",
                   help="accept training patches of different sizes (then set data.image_size when training)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding/checking the source files")
    p.add_argument("--mpp", type=float, default=None,
                   help="microns per pixel of the patches (recorded in info.json; segment_slides reads slides at it)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="png",
                   help="encoding of the training images: png (default, exact), webp (lossless, faster to "
                        "decode), jpeg (lossy, fastest; decoded on the GPU by DALI); val/test and masks stay PNG")
    p.add_argument("--image-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                   help=f"JPEG quality 1-100 for --image-format jpeg (default {DEFAULT_JPEG_QUALITY})")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by make_shards")
    return p.parse_args(argv)


def mixed_sizes(samples) -> str:
    """"" when every sample has one size; else the sizes by count, with a file of the rarest."""
    from collections import Counter

    counts = Counter(c.size for c in samples)
    if len(counts) <= 1:
        return ""
    rare = min(counts, key=counts.get)
    example = next(c.item.image for c in samples if c.size == rare)
    sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in counts.most_common(4))
    return f"{sizes}{' ...' if len(counts) > 4 else ''}; e.g. {example}"


def report_bad(bad, skip: bool) -> None:
    verb = "skipped" if skip else "found"
    for path, problem in bad:
        print(f"bad input: {path}: {problem}", file=sys.stderr)
    kinds = ", ".join(f"{n} x {kind}" for kind, n in bad_counter(bad).items())
    print(f"{len(bad)} bad file(s) {verb}: {kinds}", file=sys.stderr)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.mpp is not None and not (math.isfinite(args.mpp) and args.mpp > 0):
        print(f"error: --mpp {args.mpp}: must be a finite number > 0 (e.g. 0.5 for 20x)", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers {args.workers}: must be >= 1", file=sys.stderr)
        return 2
    if not 1 <= args.image_quality <= 100:
        print(f"error: --image-quality {args.image_quality}: use 1..100 (95 keeps stain detail)", file=sys.stderr)
        return 2
    # Before any work: --out must not be (inside) --src, nor a foreign folder (write_plan
    # deletes info.json, *.tmp and {split}-*.tar/.idx that it does not plan to keep).
    check_not_overlapping(Path(args.out), [args.src], in_flag="--src")
    try:
        plan = build_plan(create_layout(args.layout), args.src, args.shard_size, args.workers)
    except ValueError as exc:
        if isinstance(exc, MlpsError):
            raise
        raise InputError(str(exc)) from exc
    if plan.bad:
        report_bad(plan.bad, args.skip_bad)
        if not args.skip_bad:
            print("nothing written; fix or remove these files, or pass --skip-bad", file=sys.stderr)
            return 2
    if not plan.splits.get("train"):
        print(f"error: {args.src}: no usable training patches", file=sys.stderr)
        return 2
    mixed = mixed_sizes(plan.splits["train"])
    if mixed and not args.allow_mixed_sizes:
        print(f"error: {args.src}: the training patches differ in size ({mixed}); the training and inference "
              f"scale is the patch size: resize or remove the odd ones, or pass --allow-mixed-sizes (and set "
              f"data.image_size)", file=sys.stderr)
        return 2
    # Claimed and locked (mlps_dist/core/toolout.py): a second make_shards into --out is refused.
    with tool_output(args.out, [args.src], "make_shards", force=args.force, owned_if=("info.json",),
                     in_flag="--src"):
        info = write_plan(plan, args.out, image_format=args.image_format, image_quality=args.image_quality,
                          extra={"mpp": args.mpp} if args.mpp else None)
    for line in summary_lines(info):
        print(line)
    print(f"wrote {Path(args.out) / 'info.json'}")
    return 0


def main(argv=None) -> int:
    return runner.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
