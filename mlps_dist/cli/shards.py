"""``mlps shards``: a LUAD-HistoSeg or BCSS-WSSS folder -> shards (mlps_dist/data/make_shards.py).

mlps shards --layout luad --src data/LUAD-HistoSeg --out data/luad/shards
mlps shards ... --image-format jpeg --image-quality 95   # faster training input
"""

from __future__ import annotations

from mlps_dist.cli import parser

HELP = "convert a LUAD-HistoSeg / BCSS-WSSS folder into shards (checked first; resumable)"
EPILOG = """\
Every source file is decoded and checked before anything is written; problems are listed with
the file and what is wrong, and the conversion stops (exit 2) unless --skip-bad is given, in
which case the bad files are listed, counted and left out. Shards are committed atomically and
info.json is written last: after a crash, rerun the same command and it finishes the job,
reusing the shards that are already complete."""


def build_parser():
    from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY, IMAGE_FORMATS

    p = parser("shards", HELP, EPILOG)
    p.add_argument("--layout", required=True, choices=["luad", "bcss"])
    p.add_argument("--src", required=True, help="dataset folder (holds train/ or training/, val/, test/)")
    p.add_argument("--out", required=True, help="shard folder to write (becomes data.root)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad files (listed) instead of stopping")
    p.add_argument(
        "--allow-mixed-sizes",
        action="store_true",
        help="accept training patches of different sizes (then set data.image_size when training)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes decoding/checking the source files")
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="microns per pixel of the patches (recorded in info.json; mlps segment reads slides at it)",
    )
    p.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="png",
        help="encoding of the training images: png (exact), webp (lossless, faster to decode), "
        "jpeg (lossy, fastest; decoded on the GPU by DALI); val/test and masks stay PNG",
    )
    p.add_argument(
        "--image-quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality 1-100 for --image-format jpeg"
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by mlps shards")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from mlps_dist.data.make_shards import make_shards, print_summary

    info = make_shards(
        args.layout,
        args.src,
        args.out,
        shard_size=args.shard_size,
        skip_bad=args.skip_bad,
        allow_mixed_sizes=args.allow_mixed_sizes,
        workers=args.workers,
        mpp=args.mpp,
        image_format=args.image_format,
        image_quality=args.image_quality,
        force=args.force,
    )
    print_summary(info, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
