"""``mlps mosaics``: real-tissue patches with exact masks in the LUAD-HistoSeg layout, from
single-class tiles (mlps_dist/synthetic/mosaic_tiles.py, mlps_dist/synthetic/mosaics.py).

    mlps mosaics --tiles ../shared/real/kather2016_dev --out data/real/raw \\
        --train 600 --val 40 --test 80 --split-by-source \\
        --sources-train 01,02,03 --sources-val 04 --sources-test 05 --seed 0
    mlps shards --layout luad --src data/real/raw --out data/real/shards --mpp 0.495
"""

from __future__ import annotations

import os

from mlps_dist.cli import parser

HELP = "real-tissue training patches with exact masks, drawn from folders of single-class tiles"
EPILOG = """\
--tiles holds one folder of tiles per class (DIR/CLASS/*.png|jpg|tif; e.g. Kather et al. 2016,
NCT-CRC-HE-100K, a lab's own labelled tiles). Every patch is an irregular region map over 1-3
tissue classes of one source image, each region one real tile of its class (randomly rotated or
mirrored), with holes of real empty glass (--background) in some patches. The masks are exact
by construction: ignore (4) on glass and on the white pixels inside tissue tiles (lumen, fat:
grey > 200 and near grey), as LUAD-HistoSeg treats white. The train label (in the file name)
is the set of classes in the patch's mask: a class covering less than --min-share of the
non-ignored pixels is absorbed into its neighbours first. With --split-by-source whole source
images go to one split each (named by --source-regex or --source-csv; pinned with
--sources-train/--sources-val/--sources-test); OUT/sources.json says which went where.
Rerunning the same command after an interruption finishes the job; the same seed gives the
same bytes for any --workers.

--stain-change (val/test only; training patches untouched): another lab's stain and scanner:
the H and E optical densities (Ruifrok-Johnston vectors) scaled by about --stain-h and
--stain-e (0.55, 0.6: about half the stain; the residual channel by their mean), both stain
vectors turned by about --stain-hue degrees (12) about the grey axis, the lamp scaled by
--stain-brightness (1.05); each drawn per patch within a few percent of those values. The
masks do not change."""


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    from mlps_dist.synthetic.mosaic_tiles import DEFAULT_CLASSES, DEFAULT_SOURCE_REGEX, LUAD_CLASSES

    p = parser("mosaics", HELP, EPILOG)
    p.add_argument("--tiles", required=True, help="folder of class folders of tiles")
    p.add_argument("--out", required=True, help="output folder (new or empty, or an interrupted run's)")
    p.add_argument(
        "--classes",
        default=DEFAULT_CLASSES,
        help=f"LUAD class = tile folder, comma-separated; "
        f"names from {', '.join(LUAD_CLASSES)}, the label digits follow that order",
    )
    p.add_argument(
        "--background", default="BACK", help="folder of empty-glass tiles for the holes ('none': no glass holes)"
    )
    p.add_argument("--train", type=int, default=600, help="train patches (labels in the file names)")
    p.add_argument("--val", type=int, default=40, help="val patches with masks")
    p.add_argument("--test", type=int, default=80, help="test patches with masks")
    p.add_argument("--size", type=int, default=None, help="patch side in pixels (default: the tiles' smallest side)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes drawing patches (same bytes for any number; the cores, at most 8)",
    )
    g = p.add_argument_group("splits")
    g.add_argument(
        "--split-by-source",
        action="store_true",
        help="whole source images per split, none in two (default: tiles split 70/10/20 per class)",
    )
    g.add_argument(
        "--source-regex",
        default=None,
        help=f"names a tile's source image in its file name: group 'source', else group 1, else the "
        f"match (default: {DEFAULT_SOURCE_REGEX!r}: 10F32_CRC-Prim-HE-03_012_... -> CRC-Prim-HE-03)",
    )
    g.add_argument(
        "--source-csv",
        default=None,
        help="CSV 'file,source' instead of --source-regex (file relative to --tiles, or a bare file name)",
    )
    for split in ("train", "val", "test"):
        g.add_argument(
            f"--sources-{split}",
            type=_names,
            default=None,
            help=f"comma-separated source images for {split} (a unique suffix is enough: 04)"
            + ("; default: every source not pinned elsewhere" if split == "train" else ""),
        )
    m = p.add_argument_group("patches")
    m.add_argument(
        "--classes-per-patch",
        type=lambda t: tuple(float(v) for v in t.split(",")),
        default=None,
        help="P(1,2,3 classes) (default: 0.35,0.40,0.25)",
    )
    m.add_argument("--glass-prob", type=float, default=None, help="share of patches with glass holes (0.35)")
    m.add_argument(
        "--min-share",
        type=float,
        default=None,
        help="a class below this share of a patch's non-ignored pixels is absorbed (0.02)",
    )
    s = p.add_argument_group("stain change (val/test only)")
    s.add_argument("--stain-change", action="store_true", help="apply another lab's stain and scanner to val/test")
    s.add_argument("--stain-h", type=float, default=None, help="x hematoxylin optical density (0.55)")
    s.add_argument("--stain-e", type=float, default=None, help="x eosin optical density (0.6)")
    s.add_argument("--stain-hue", type=float, default=None, help="degrees the stain vectors turn (12)")
    s.add_argument("--stain-brightness", type=float, default=None, help="x scanner lamp (1.05)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by mlps mosaics")
    return p.parse_args(argv)


def options_from(args, size: int):
    """The patch options of the flags given (MosaicOptions' defaults for the others), checked."""
    from mlps_dist.core.errors import InputError
    from mlps_dist.synthetic.mosaics import MosaicOptions

    given = {
        "classes_per_patch": args.classes_per_patch,
        "glass_prob": args.glass_prob,
        "min_share": args.min_share,
        "stain_h": args.stain_h,
        "stain_e": args.stain_e,
        "stain_hue": args.stain_hue,
        "stain_brightness": args.stain_brightness,
    }
    options = MosaicOptions(
        size=size, stain_change=args.stain_change, **{k: v for k, v in given.items() if v is not None}
    )
    if size < 32:
        raise InputError(f"--size {size}: patches must be at least 32 pixels wide")
    probs = options.classes_per_patch
    if not 1 <= len(probs) <= 3 or min(probs) < 0 or sum(probs) <= 0:
        raise InputError(f"--classes-per-patch {probs}: give 1-3 non-negative shares for 1, 2, 3 classes")
    if not 0 <= options.glass_prob <= 1 or not 0 <= options.min_share < 0.5:
        raise InputError("--glass-prob must be 0..1 and --min-share 0..0.5")
    if min(options.stain_h, options.stain_e, options.stain_brightness) <= 0:
        raise InputError("--stain-h, --stain-e and --stain-brightness must be > 0")
    return options


def _main(argv=None) -> int:
    from mlps_dist.core.errors import InputError
    from mlps_dist.core.outdirs import claim_output_dir
    from mlps_dist.synthetic.mosaic_tiles import parse_classes, scan_tiles, split_by_source, split_by_tile
    from mlps_dist.synthetic.mosaics import write_mosaics

    args = parse_args(argv)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    for split, n in counts.items():
        if n < 0:
            raise InputError(f"--{split} {n}: the number of patches must be >= 0")
    if args.source_csv and args.source_regex:
        raise InputError("--source-csv and --source-regex: give one way of naming the source images")
    pins = {s: getattr(args, f"sources_{s}") for s in counts if getattr(args, f"sources_{s}")}
    if pins and not args.split_by_source:
        raise InputError(f"--sources-{next(iter(pins))}: pinning source images needs --split-by-source")
    classes = parse_classes(args.classes)
    background = None if args.background.lower() == "none" else args.background
    if background in classes.values():
        raise InputError(f"--background {background}: is also a tissue class in --classes")
    catalogue = scan_tiles(
        args.tiles, classes, background, args.source_regex, args.source_csv, require_sources=args.split_by_source
    )
    options = options_from(args, args.size or catalogue.size)
    if args.split_by_source:
        plan = split_by_source(catalogue, counts, args.seed, pins)
    else:
        plan = split_by_tile(catalogue, counts, args.seed)
        print(
            "make_mosaics: tiles split by tile, a source image may be in several splits "
            "(--split-by-source keeps them apart)"
        )
    out = claim_output_dir(
        args.out, [args.tiles], "make_mosaics", force=args.force, owned_if=("mosaics.json",), in_flag="--tiles"
    )
    summary = write_mosaics(out, catalogue, plan, counts, args.seed, options, workers=max(1, args.workers))
    for split, record in summary["sources"]["splits"].items():
        tiles = ", ".join(f"{c} {sum(v.values())}" for c, v in record["tiles"].items())
        print(
            f"{split}: {record['patches']} patches from {', '.join(record['sources'])} "
            f"(tiles: {tiles}; glass {record['glass_tiles']})"
        )
        if "patches_labelled" in record:
            print("  patches labelled: " + ", ".join(f"{c} {n}" for c, n in record["patches_labelled"].items()))
        else:
            print("  pixel share: " + ", ".join(f"{c} {v:.2f}" for c, v in record["pixel_share"].items()))
    if plan.unused:
        print(f"unused source images: {', '.join(plan.unused)}")
    print(
        f"{out}: {summary['generated']} patches written ({options.size} px"
        f"{', stain change on val/test' if options.stain_change else ''}); sources in {out / 'sources.json'}"
    )
    return 0


def main(argv=None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
