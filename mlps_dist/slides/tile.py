"""Cut whole-slide images (and their QuPath annotations) into training shards (``mlps tile``).

Annotations: QuPath GeoJSON (``mlps segment``'s regions.geojson too), ImageScope or ASAP XML,
found as NAME.geojson, NAME.EXT.geojson, NAME.xml or NAME.EXT.xml in --annotations, or named
per slide by --annotations-map; --class-map maps their class names (exact, or glob patterns)
to classes or to ignore. docs/slides.md has the rules.

Output: the shard format of ``mlps shards`` (every stage trains on it unchanged);
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

import csv
import sys
from pathlib import Path

import numpy as np

from mlps_dist.core.draw import palette_for
from mlps_dist.core.errors import EXIT_BAD_INPUT, InputError
from mlps_dist.data.layouts import BCSS, LUAD
from mlps_dist.slides.annotation_files import find_annotation_files
from mlps_dist.slides.annotations import load_annotations
from mlps_dist.slides.class_map import parse_class_map
from mlps_dist.slides.reader import Slide, SlideError, list_slides, slide_stem
from mlps_dist.slides.tile_work import tile_my_slides
from mlps_dist.slides.tiling import (
    SlideJob,
    TileSpec,
    remove_parts,
    remove_stale_shards,
    write_assigned_shards,
    write_slide_info,
)

SPLITS = ("train", "val", "test")
# Tiles of a known dataset's classes get that dataset's colours (its ignore white is added last).
KNOWN_PALETTES = {layout.classes: list(layout.palette[:-1]) for layout in (LUAD, BCSS)}


def assign_splits(names: list[str], splits_csv: str | None, ratios: str, seed: int) -> dict[str, str]:
    if splits_csv:
        table = {}
        with open(splits_csv, newline="") as f:
            for row in csv.reader(f):
                if (
                    not row
                    or row[0].strip().startswith("#")
                    or [c.strip().lower() for c in row[:2]] == ["slide", "split"]
                ):
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
        raise InputError(
            f"--split-ratios {ratios!r}: expected three shares train,val,test such as 0.7,0.15,0.15"
        ) from None
    if not shares[0] > 0:
        raise InputError(
            f"--split-ratios {ratios!r}: the train share is 0, so no training tiles would be written; "
            f"give it a share, or assign the slides with --splits (a 'slide,split' CSV)"
        )
    order = list(np.random.default_rng(seed).permutation(sorted(names)))
    bounds = np.round(np.cumsum(shares) / sum(shares) * len(order)).astype(int)
    bounds[0] = max(bounds[0], 1 if shares[0] > 0 else 0)  # at least one training slide
    out = {}
    for i, name in enumerate(order):
        out[str(name)] = SPLITS[int(np.searchsorted(bounds, i, side="right"))] if i < bounds[-1] else "test"
    return out


def check_inputs(args) -> tuple[list[SlideJob], TileSpec, list[tuple[str, str]]]:
    """Every check that needs no tile read: returns (jobs, spec, unopenable slides)."""
    from mlps_dist import dist  # torch: only where the ranks work together

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(set(classes)) != len(classes) or not classes:
        raise InputError(f"--classes {args.classes!r}: give distinct class names separated by commas")
    spec = TileSpec(
        mpp=args.mpp,
        tile=args.tile,
        stride=args.stride,
        min_tissue=args.min_tissue,
        classes=classes,
        class_map=parse_class_map(args.class_map, classes),
        label_min_fraction=args.label_min_fraction,
        tissue_mpp=args.tissue_mpp,
        slide_mpp=args.slide_mpp,
        image_format=args.image_format,
        image_quality=args.image_quality,
    )
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
        raise InputError(
            f"slide(s) without microns per pixel: {[p for p, _ in no_mpp]}; pass --slide-mpp with "
            f"the scanner's resolution or remove them"
        )
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
    from mlps_dist import dist  # torch: only where the ranks work together
    from mlps_dist.core.toolout import tool_output

    jobs, spec, bad = check_inputs(args)
    inputs = list(args.slides) + [a for a in (args.annotations, args.annotations_map) if a]
    inputs += [j.annotations for j in jobs if j.annotations]
    with tool_output(
        args.out, inputs, "tile_slides", dist, force=args.force, owned_if=(".parts",), in_flag="--slides/--annotations"
    ):
        return _run(args, jobs, spec, bad)


def _run(args, jobs, spec, bad) -> int:
    from mlps_dist import dist  # torch: only where the ranks work together

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
        palette = KNOWN_PALETTES.get(tuple(spec.classes)) or palette_for(len(spec.classes), None)[: len(spec.classes)]
        info = write_slide_info(
            out, records, spec, list(palette) + [(255, 255, 255)], args.shard_size, {"bad_slides": [p for p, _ in bad]}
        )
        if not args.keep_parts:
            remove_parts(out)
        for split, s in info["splits"].items():
            print(
                f"{split}: {s['count']} tiles from {len(s['slides'])} slide(s) in {len(s['shards'])} shard(s); "
                f"per class: {dict(zip(spec.classes, s['class_counts']))}"
            )
        for r in records:
            if r["count"] == 0:
                print(
                    f"warning: slide {r['slide']} ({r['split']}) gave no tiles: "
                    f"{'no annotated region covers enough tissue' if r.get('annotations') else 'too little tissue'} "
                    f"at --min-tissue {args.min_tissue}, --label-min-fraction {args.label_min_fraction}; "
                    f"check its annotations' coordinates and classes",
                    file=sys.stderr,
                )
        reused = sum(1 for r in records if r.get("reused"))
        if reused:
            print(f"reused {reused} slide(s) finished by an earlier run")
        print(f"wrote {out / 'info.json'}")
        for _path, error in bad:
            print(f"bad slide skipped: {error}", file=sys.stderr)
        if bad:
            print(f"{len(bad)} slide(s) skipped; the others are written", file=sys.stderr)
    dist.barrier()
    return EXIT_BAD_INPUT if bad else 0
