"""``mlps synthetic-slides``: synthetic whole slides (pyramidal tiled TIFF with MPP) and their
QuPath GeoJSON (mlps_dist/synthetic/slides.py), the slide demo's data.

    mlps synthetic-slides --out data/demo/wsi --count 4 --width 3072 --height 2048
"""

from __future__ import annotations

from pathlib import Path

from mlps_dist.cli import parser

HELP = "generate synthetic whole slides (pyramidal TIFF) with QuPath GeoJSON annotations"
EPILOG = """\
Writes OUT/slides/<name>.tiff, OUT/annotations/<name>.geojson and OUT/synthetic_slides.json
(with the --class-map that maps the QuPath names to TE,NEC,LYM,TAS for mlps tile). Slides
already there are kept, so an interrupted run finishes on the next one."""


def main(argv: list[str] | None = None) -> int:
    p = parser("synthetic-slides", HELP, EPILOG)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=2, help="number of slides")
    p.add_argument("--width", type=int, default=3072, help="level-0 width in pixels")
    p.add_argument("--height", type=int, default=2048, help="level-0 height in pixels")
    p.add_argument("--slide-mpp", type=float, default=1.0, help="level-0 microns per pixel written (0: none)")
    p.add_argument("--cell", type=int, default=600, help="typical side of one tissue region in pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, same slides")
    args = p.parse_args(argv)
    if args.count < 1 or min(args.width, args.height) < 256:
        p.error("need --count >= 1 and slides of at least 256 x 256 pixels")
    from mlps_dist.synthetic.slides import write_synthetic_slides

    summary = write_synthetic_slides(
        args.out, args.count, args.width, args.height, args.seed, args.slide_mpp or None, args.cell
    )
    print(
        f"{args.out}: {len(summary['slides'])} slide(s) of {args.width} x {args.height} px at {args.slide_mpp} "
        f'um/px; annotations in {Path(args.out) / "annotations"}; --class-map "{summary["class_map"]}"'
    )
    return 0
