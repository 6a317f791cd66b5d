"""Cut whole-slide images (and their QuPath annotations) into training shards.

    python tools/tile_slides.py --slides slides/ --out data/wsi/shards --mpp 0.5 --tile 224 \
        --annotations annotations/ --classes TE,NEC,LYM,TAS \
        --class-map "Tumor=TE,Necrosis=NEC,Immune cells=LYM,Stroma=TAS" --split-ratios 0.7,0.15,0.15
    torchrun --nproc_per_node=4 tools/tile_slides.py ...     # slides split over ranks

Annotations: QuPath GeoJSON (segment_slides' regions.geojson too), ImageScope or ASAP XML,
found as NAME.geojson, NAME.EXT.geojson, NAME.xml or NAME.EXT.xml in --annotations, or named
per slide by --annotations-map; --class-map maps their class names (exact, or glob patterns)
to classes or to ignore. docs/slides.md has the rules.

Output: the shard format of tools/make_shards.py (every stage trains on it unchanged);
info.json adds ``mpp``, the slides of each split, the class map and each slide's annotation
file with its sha256; each sample's json has slide, x, y (level-0 top-left), size0, mpp and
tissue. Splits are by slide (``--splits`` CSV of ``slide,split`` lines, or ``--split-ratios``
with ``--seed``). Tissue masks for checking: OUT/tissue/<slide>.png. Without annotations
every tile with enough tissue is written with an empty label (for inspection or
unsupervised use; the MLPS stages need annotations). Progress (grid tiles done / total,
tiles/s, ETA) goes to stderr: a redrawn line on a terminal, a plain line every 30 s in a log.

Everything about the inputs is checked first (slides open and have an MPP, every
annotation file exists and its class names map); a slide that then fails while being read
(truncated, damaged) is named and skipped, the others are written, and the exit status is
non-zero. A killed run, rerun, keeps the slides it finished.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mlps_dist import dist  # noqa: E402
from mlps_dist.core.draw import palette_for  # noqa: E402
from mlps_dist.core import runner  # noqa: E402
from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY, IMAGE_FORMATS  # noqa: E402
from mlps_dist.core.errors import EXIT_BAD_INPUT, InputError  # noqa: E402
from mlps_dist.slides.annotation_files import find_annotation_files  # noqa: E402
from mlps_dist.slides.annotations import load_annotations  # noqa: E402
from mlps_dist.slides.class_map import parse_class_map  # noqa: E402
from mlps_dist.slides.reader import Slide, SlideError, list_slides, slide_stem  # noqa: E402
from mlps_dist.slides.tile_work import tile_my_slides  # noqa: E402
from mlps_dist.slides.tiling import (SlideJob, TileSpec, remove_parts, remove_stale_shards,  # noqa: E402
                                     write_assigned_shards, write_slide_info)

SPLITS = ("train", "val", "test")
KNOWN_PALETTES = {("TE", "NEC", "LYM", "TAS"): [(205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0)],
                  ("TUM", "STR", "LYM", "NEC"): [(0, 64, 128), (64, 128, 0), (243, 152, 0), (255, 0, 0)]}


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (required flags, switches, empty)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" or action.required:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_DefaultsHelp)
    p.add_argument("--slides", nargs="+", required=True, help="slide files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="shard folder to write (becomes data.root)")
    p.add_argument("--mpp", type=float, required=True, help="microns per pixel of the tiles")
    p.add_argument("--tile", type=int, default=224, help="tile side in pixels at --mpp")
    p.add_argument("--stride", type=int, default=0, help="tile step in pixels at --mpp (0: --tile)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="least tissue fraction of a kept tile")
    p.add_argument("--annotations", default=None,
                   help="folder of annotation files, one per slide NAME.EXT: NAME.geojson or NAME.EXT.geojson "
                        "(QuPath GeoJSON, e.g. slide1.svs.geojson), NAME.xml or NAME.EXT.xml (ImageScope/ASAP); "
                        "two of these for one slide are refused")
    p.add_argument("--annotations-map", default=None, metavar="CSV",
                   help="CSV of 'slide,annotation-file' rows (slide: name without extension, or file name; a "
                        "relative file is relative to the CSV's folder; an optional header row starts with "
                        "'slide'); its rows take precedence over --annotations")
    p.add_argument("--classes", default="TE,NEC,LYM,TAS", help="class names in label order")
    p.add_argument("--class-map", default="",  # empty: only names equal to a class map
                   help='annotation name -> class or ignore, comma-separated NAME=TARGET, case-insensitive, e.g. '
                        '"Tumor=TE,Stroma*=TAS,Other=ignore,Region*=ignore"; NAME with * ? [ is an fnmatch '
                        'pattern; exact names first, then the class names, then patterns in the order given; '
                        'ignore: left out of labels, the ignore index in masks')
    p.add_argument("--label-min-fraction", type=float, default=0.05,
                   help="a class covering at least this share of a train tile is in its label")
    p.add_argument("--splits", default=None, help="CSV of slide,split lines (slide = file name without extension)")
    p.add_argument("--split-ratios", default="0.7,0.15,0.15", help="train,val,test shares of the slides")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by ratios")
    p.add_argument("--slide-mpp", type=float, default=None,
                   help="level-0 microns per pixel of every slide, overriding (or standing in for) the stored MPP")
    p.add_argument("--tissue-mpp", type=float, default=8.0, help="resolution of the tissue mask")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--workers", type=int, default=1, help="processes per rank, each tiling one slide at a time")
    p.add_argument("--keep-parts", action="store_true", help="keep the per-slide parts after assembly")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by tile_slides")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="png",
                   help="encoding of the training tiles: png (exact), webp (lossless, faster to decode), "
                        "jpeg (lossy, fastest; decoded on the GPU by DALI); val/test tiles and masks stay PNG")
    p.add_argument("--image-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                   help="JPEG quality 1-100 for --image-format jpeg")
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


def assign_splits(names: list[str], splits_csv: str | None, ratios: str, seed: int) -> dict[str, str]:
    if splits_csv:
        table = {}
        with open(splits_csv, newline="") as f:
            for row in csv.reader(f):
                if not row or row[0].strip().startswith("#") or [c.strip().lower() for c in row[:2]] == ["slide", "split"]:
                    continue
                if len(row) < 2 or row[1].strip() not in SPLITS:
                    raise InputError(f"{splits_csv}: line {row}: expected 'slide,split' with split in {SPLITS}")
                table[row[0].strip()] = row[1].strip()
        missing = [n for n in names if n not in table]
        if missing:
            raise InputError(f"{splits_csv}: no split for slide(s) {missing}; add a 'slide,split' line for each")
        return {n: table[n] for n in names}
    try:
        shares = [float(v) for v in ratios.split(",")]
        assert len(shares) == 3 and all(s >= 0 for s in shares) and sum(shares) > 0
    except (ValueError, AssertionError):
        raise InputError(f"--split-ratios {ratios!r}: expected three shares train,val,test such as 0.7,0.15,0.15")
    if not shares[0] > 0:
        raise InputError(f"--split-ratios {ratios!r}: the train share is 0, so no training tiles would be written; "
                         f"give it a share, or assign the slides with --splits (a 'slide,split' CSV)")
    order = list(np.random.default_rng(seed).permutation(sorted(names)))
    bounds = np.round(np.cumsum(shares) / sum(shares) * len(order)).astype(int)
    bounds[0] = max(bounds[0], 1 if shares[0] > 0 else 0)  # at least one training slide
    out = {}
    for i, name in enumerate(order):
        out[str(name)] = SPLITS[int(np.searchsorted(bounds, i, side="right"))] if i < bounds[-1] else "test"
    return out


def check_inputs(args) -> tuple[list[SlideJob], TileSpec, list[tuple[str, str]]]:
    """Every check that needs no tile read: returns (jobs, spec, unopenable slides)."""
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(set(classes)) != len(classes) or not classes:
        raise InputError(f"--classes {args.classes!r}: give distinct class names separated by commas")
    spec = TileSpec(mpp=args.mpp, tile=args.tile, stride=args.stride, min_tissue=args.min_tissue, classes=classes,
                    class_map=parse_class_map(args.class_map, classes), label_min_fraction=args.label_min_fraction,
                    tissue_mpp=args.tissue_mpp, slide_mpp=args.slide_mpp, image_format=args.image_format,
                    image_quality=args.image_quality)
    paths = list_slides(args.slides)
    bad, no_mpp, good, dims = [], [], [], {}
    for path in paths:
        try:
            with Slide(path, args.slide_mpp) as slide:
                dims[str(path)] = (slide.width, slide.height)
            good.append(path)
        except SlideError as exc:
            (no_mpp if "microns per pixel" in str(exc) else bad).append((str(path), str(exc)))
    if no_mpp:
        raise InputError(f"slide(s) without microns per pixel: {[p for p, _ in no_mpp]}; pass --slide-mpp with "
                         f"the scanner's resolution or remove them")
    splits = assign_splits([slide_stem(p) for p in paths], args.splits, args.split_ratios, args.seed)
    files = find_annotation_files(good, args.annotations, args.annotations_map, listed=paths)
    jobs = []
    for path in good:
        annotation = files[slide_stem(path)]
        if annotation is not None:
            # Unmapped names, bad coordinates and regions off the slide fail here, before any tile.
            notes = load_annotations(annotation, classes, spec.class_map, bounds=dims[str(path)]).notes
            if dist.is_main():
                for note in notes:
                    print(f"warning: {note}", file=sys.stderr)
        jobs.append(SlideJob(str(path), splits[slide_stem(path)], str(annotation) if annotation else None))
    return jobs, spec, bad


def run(args) -> int:
    """Tile into ``args.out``, checked against the inputs, claimed and locked first
    (mlps_dist/core/toolout.py); only files this tool wrote there are ever replaced or deleted."""
    from mlps_dist.core.toolout import tool_output

    jobs, spec, bad = check_inputs(args)
    inputs = list(args.slides) + [a for a in (args.annotations, args.annotations_map) if a]
    inputs += [j.annotations for j in jobs if j.annotations]
    with tool_output(args.out, inputs, "tile_slides", dist, force=args.force, owned_if=(".parts",),
                     in_flag="--slides/--annotations"):
        return _run(args, jobs, spec, bad)


def _run(args, jobs, spec, bad) -> int:
    out = Path(args.out)
    if dist.is_main():
        (out / "info.json").unlink(missing_ok=True)  # incomplete until assembled (the folder is ours)
    dist.barrier()
    mine = tile_my_slides(jobs, spec, out, args.workers, show_progress=dist.is_main())
    results = [r for share in dist.all_gather_object(mine) for r in share]
    bad += [(r["bad"], r["error"]) for r in results if "bad" in r]
    records = sorted((r for r in results if "bad" not in r), key=lambda r: r["slide"])
    if dist.is_main():
        remove_stale_shards(out, records, args.shard_size)
    dist.barrier()
    write_assigned_shards(out, records, args.shard_size, dist.get_world_size(), dist.get_rank())
    dist.barrier()
    if dist.is_main():
        palette = KNOWN_PALETTES.get(tuple(spec.classes)) or palette_for(len(spec.classes), None)[:len(spec.classes)]
        info = write_slide_info(out, records, spec, list(palette) + [(255, 255, 255)], args.shard_size,
                                {"bad_slides": [p for p, _ in bad]})
        if not args.keep_parts:
            remove_parts(out)
        for split, s in info["splits"].items():
            print(f"{split}: {s['count']} tiles from {len(s['slides'])} slide(s) in {len(s['shards'])} shard(s); "
                  f"per class: {dict(zip(spec.classes, s['class_counts']))}")
        for r in records:
            if r["count"] == 0:
                print(f"warning: slide {r['slide']} ({r['split']}) gave no tiles: "
                      f"{'no annotated region covers enough tissue' if r.get('annotations') else 'too little tissue'} "
                      f"at --min-tissue {args.min_tissue}, --label-min-fraction {args.label_min_fraction}; "
                      f"check its annotations' coordinates and classes", file=sys.stderr)
        reused = sum(1 for r in records if r.get("reused"))
        if reused:
            print(f"reused {reused} slide(s) finished by an earlier run")
        print(f"wrote {out / 'info.json'}")
        for path, error in bad:
            print(f"bad slide skipped: {error}", file=sys.stderr)
        if bad:
            print(f"{len(bad)} slide(s) skipped; the others are written", file=sys.stderr)
    dist.barrier()
    return EXIT_BAD_INPUT if bad else 0


def _main(argv=None) -> int:
    args = parse_args(argv)
    dist.init("auto")
    try:
        return run(args)
    finally:
        dist.teardown()


def main(argv=None) -> int:
    return runner.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
