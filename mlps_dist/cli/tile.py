"""``mlps tile``: whole-slide images and their annotations -> training shards at a target MPP
(mlps_dist/slides/tile.py).

    mlps tile --slides slides/ --out data/wsi/shards --mpp 0.5 --tile 224 \\
        --annotations annotations/ --classes TE,NEC,LYM,TAS \\
        --class-map "Tumor=TE,Necrosis=NEC,Immune cells=LYM,Stroma=TAS" --split-ratios 0.7,0.15,0.15
    torchrun --nproc_per_node=4 -m mlps_dist -- tile ...     # slides split over ranks
"""

from __future__ import annotations

from mlps_dist.cli import parser

HELP = "cut whole slides (+ QuPath/ImageScope/ASAP annotations) into training shards at --mpp"
EPILOG = """\
Annotations: QuPath GeoJSON (mlps segment's regions.geojson too), ImageScope or ASAP XML, found
as NAME.geojson, NAME.EXT.geojson, NAME.xml or NAME.EXT.xml in --annotations, or named per
slide by --annotations-map; --class-map maps their class names (exact, or glob patterns) to
classes or to ignore. Splits are by slide (--splits CSV, or --split-ratios with --seed).
Everything about the inputs is checked first; a slide that then fails while being read is
named and skipped, the others are written, and the exit status is non-zero. A killed run,
rerun, keeps the slides it finished. docs/slides.md has the rules."""


def parse_args(argv=None):
    from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY, IMAGE_FORMATS

    p = parser("tile", HELP, EPILOG)
    p.add_argument("--slides", nargs="+", required=True, help="slide files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="shard folder to write (becomes data.root)")
    p.add_argument("--mpp", type=float, required=True, help="microns per pixel of the tiles")
    p.add_argument("--tile", type=int, default=224, help="tile side in pixels at --mpp")
    p.add_argument("--stride", type=int, default=0, help="tile step in pixels at --mpp (0: --tile)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="least tissue fraction of a kept tile")
    p.add_argument(
        "--annotations",
        default=None,
        help="folder of annotation files, one per slide NAME.EXT: NAME.geojson or NAME.EXT.geojson "
        "(QuPath GeoJSON, e.g. slide1.svs.geojson), NAME.xml or NAME.EXT.xml (ImageScope/ASAP); "
        "two of these for one slide are refused",
    )
    p.add_argument(
        "--annotations-map",
        default=None,
        metavar="CSV",
        help="CSV of 'slide,annotation-file' rows (slide: name without extension, or file name; a "
        "relative file is relative to the CSV's folder; an optional header row starts with "
        "'slide'); its rows take precedence over --annotations",
    )
    p.add_argument("--classes", default="TE,NEC,LYM,TAS", help="class names in label order")
    p.add_argument(
        "--class-map",
        default="",  # empty: only names equal to a class map
        help="annotation name -> class or ignore, comma-separated NAME=TARGET, case-insensitive, e.g. "
        '"Tumor=TE,Stroma*=TAS,Other=ignore,Region*=ignore"; NAME with * ? [ is an fnmatch '
        "pattern; exact names first, then the class names, then patterns in the order given; "
        "ignore: left out of labels, the ignore index in masks",
    )
    p.add_argument(
        "--label-min-fraction",
        type=float,
        default=0.05,
        help="a class covering at least this share of a train tile is in its label",
    )
    p.add_argument("--splits", default=None, help="CSV of slide,split lines (slide = file name without extension)")
    p.add_argument("--split-ratios", default="0.7,0.15,0.15", help="train,val,test shares of the slides")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by ratios")
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="level-0 microns per pixel of every slide, overriding (or standing in for) the stored MPP",
    )
    p.add_argument("--tissue-mpp", type=float, default=8.0, help="resolution of the tissue mask")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--workers", type=int, default=1, help="processes per rank, each tiling one slide at a time")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-slide parts after assembly")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by mlps tile")
    p.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="png",
        help="encoding of the training tiles: png (exact), webp (lossless, faster to decode), "
        "jpeg (lossy, fastest; decoded on the GPU by DALI); val/test tiles and masks stay PNG",
    )
    p.add_argument(
        "--image-quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality 1-100 for --image-format jpeg"
    )
    args = p.parse_args(argv)
    for flag, value in (("--mpp", args.mpp), ("--slide-mpp", args.slide_mpp), ("--tissue-mpp", args.tissue_mpp)):
        if value is not None and not 0 < value < float("inf"):  # NaN fails too
            p.error(f"{flag} {value}: must be a finite number of microns per pixel > 0 (e.g. 0.5 for 20x)")
    if args.tile < 8 or args.stride < 0 or not 0 <= args.min_tissue <= 1:
        p.error("need --tile >= 8, --stride >= 0 and 0 <= --min-tissue <= 1")
    if args.shard_size < 1 or args.workers < 1:
        p.error(f"--shard-size {args.shard_size} and --workers {args.workers}: both must be >= 1")
    if not 0 < args.label_min_fraction <= 1:
        p.error(f"--label-min-fraction {args.label_min_fraction}: must be in (0, 1] (a share of the tile)")
    if not 1 <= args.image_quality <= 100:
        p.error(f"--image-quality {args.image_quality}: use 1..100 (95 keeps stain detail)")
    args.stride = args.stride or args.tile
    return args


def _main(argv=None) -> int:
    args = parse_args(argv)  # --help without loading torch (mlps_dist.dist)
    from mlps_dist import dist
    from mlps_dist.slides.tile import run

    dist.init("auto")
    try:
        return run(args)
    finally:
        dist.teardown()


def main(argv=None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
