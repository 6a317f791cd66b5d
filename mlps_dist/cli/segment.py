"""``mlps segment``: whole-slide images -> a class map per slide, stitched and measured
(mlps_dist/deploy/segment_slides.py; docs/segment_slides.md).

    mlps segment --run runs/luad --slides slides/ --out maps/
    torchrun --nproc_per_node=4 -m mlps_dist -- segment --run runs/luad --slides slides/ --out maps/
    mlps segment --model export/model.onnx --slides slides/ --out maps/   # no torch
"""

from __future__ import annotations

from mlps_dist.cli import parser

HELP = "segment whole slides: class map, pyramidal TIFF, QuPath regions, overlay and areas per slide"
EPILOG = """\
Per slide, in OUT/<slide>/: classes.png and classes.tiff (class index per map pixel at
--map-mpp), regions.geojson (QuPath annotations with area_um2), probabilities.tiff
(--probabilities), overlay.png, tissue.png and summary.json; OUT/summary.csv has a row per
slide. A killed run, rerun, redoes only unfinished slides; a slide that cannot be read is named,
the others finish, and the exit status is 3."""


def parse_args(argv):
    p = parser("segment", HELP, EPILOG)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory of a finished training")
    source.add_argument("--model", help="model.onnx written by mlps export (model.json next to it)")
    p.add_argument("--slides", nargs="+", required=True, help="slide files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-mpp", type=float, default=None, help="training MPP when the run does not record one")
    p.add_argument("--map-mpp", type=float, default=8.0, help="microns per pixel of the class map")
    p.add_argument("--stride", type=int, default=0, help="tile step in model pixels (0: half a patch)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
    p.add_argument("--readers", type=int, default=4, help="threads reading tiles ahead of the model")
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="level-0 microns per pixel of every slide, overriding the stored MPP",
    )
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="--run only: segmenter checkpoint")
    p.add_argument(
        "--max-map-gb",
        type=float,
        default=16.0,
        help="refuse a --map-mpp whose class map would need more memory than this (GB)",
    )
    p.add_argument("--no-gate", action="store_true", help="skip the classification gate")
    p.add_argument(
        "--simplify",
        type=float,
        default=1.0,
        metavar="PX",
        help="regions.geojson: simplification tolerance in map pixels (0: exact pixel outlines)",
    )
    p.add_argument(
        "--min-region-um2",
        type=float,
        default=0.0,
        help="regions.geojson: drop regions smaller than this many square microns (0: keep all)",
    )
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write probabilities.tiff: one uint8 plane per class (probability x 255), map grid",
    )
    p.add_argument(
        "--stain-scope",
        choices=("slide", "tile"),
        default="slide",
        help="a run with data.stain: estimate the stains once per slide or per tile",
    )
    args = p.parse_args(argv)
    for flag, value in (("--map-mpp", args.map_mpp), ("--slide-mpp", args.slide_mpp), ("--model-mpp", args.model_mpp)):
        if value is not None and not 0 < value < float("inf"):  # NaN fails too
            p.error(f"{flag} {value}: must be a finite number of microns per pixel > 0")
    for flag, value in (("--simplify", args.simplify), ("--min-region-um2", args.min_region_um2)):
        if not 0 <= value < float("inf"):
            p.error(f"{flag} {value}: must be a finite number >= 0")
    if not 0 < args.max_map_gb < float("inf"):
        p.error(f"--max-map-gb {args.max_map_gb}: must be a finite number > 0")
    if args.batch_size < 1 or args.stride < 0 or args.readers < 1:
        p.error("need --batch-size >= 1, --readers >= 1, --stride >= 0")
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from mlps_dist.deploy.segment_slides import segment

    return segment(args)


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
