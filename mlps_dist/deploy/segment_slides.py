"""Segment whole-slide images with a trained run: a class map per slide, stitched and measured.

    mlps segment --run runs/luad --slides slides/ --out maps/
    torchrun --nproc_per_node=4 -m mlps_dist -- segment --run runs/luad --slides slides/ --out maps/
    mlps segment --model export/model.onnx --slides slides/ --out maps/   # no torch

(The flags are mlps_dist/cli/segment.py's.) With ``--model`` (an export of ``mlps export``) the pass runs in one
process through
onnxruntime and needs neither torch nor the training stack: tiles get the same scores as
with ``--run`` (the graph holds the same normalisation, resize, networks and gate).

Per slide, in OUT/<slide>/ (docs/segment_slides.md):
- classes.png: uint8 class index per map pixel at ``--map-mpp``, the ignore index off tissue;
- classes.tiff: the same indices as a tiled pyramidal palette TIFF (the class colours as its
  colormap, resolution tags at the map's MPP) that OpenSlide opens;
- regions.geojson: one QuPath annotation per connected region of each class, level-0 pixel
  coordinates, simplified by ``--simplify`` map pixels, regions under ``--min-region-um2``
  dropped, with area_um2 and mean_probability (mlps_dist/slides/regions.py);
- probabilities.tiff (``--probabilities``): one uint8 plane per class, OME-TIFF, map grid;
- overlay.png: the slide beside the slide with its classes, 2048 px long where the slide
  has the pixels, with a legend and a scale bar;
- tissue.png and summary.json (areas, regions, the stain record, the work key);
OUT/summary.csv has a row per slide with the run, checkpoint and settings used. A run with
stain normalisation estimates each slide's stains once on its tissue (pass 1) and maps every
tile with that estimate (``--stain-scope tile``: each tile on its own, as before). Progress
(tiles done / total, tiles/s, ETA) is written by rank 0 on stderr (mlps_dist/core/progress.py).

Three passes, each split over ranks: (1) per slide, the tissue mask and thumbnail at the map
resolution; (2) the tiles of all slides that touch tissue, one global list split into
contiguous shares so every tile is predicted exactly once, each rank saving its weighted
score sums per slide; (3) per slide, one rank sums the shares, takes the argmax and writes
the outputs into a temporary folder renamed into place. A slide whose summary.json has the
current work key (slide file size and mtime, --map-mpp, --slide-mpp, stride, patch, --simplify,
--min-region-um2, --probabilities, --stain-scope, the model's files or export:
mlps_dist/slides/workkey.py) is done: a killed run, rerun, redoes only
unfinished slides (and reuses saved shares of the same key); other settings redo a slide. A slide
that cannot be read is named, the others finish, and the exit status is 3
(``EXIT_SOME_FAILED``); a bad invocation (flag, model, output folder) is 2, before any work.
See mlps_dist/slides/stitch.py for the tile geometry and blending.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mlps_dist.core import png
from mlps_dist.core.errors import EXIT_SOME_FAILED, InputError
from mlps_dist.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from mlps_dist.core.progress import Progress
from mlps_dist.slides.grid import balanced_slides, rank_share
from mlps_dist.slides.overlay import view_mpp
from mlps_dist.slides.reader import Slide, SlideError, list_slides, slide_stem
from mlps_dist.slides.slide_outputs import write_slide_outputs
from mlps_dist.slides.slide_stain import SlideStain, StainPlan
from mlps_dist.slides.slide_summary import checkpoint_label, run_label, run_settings, stain_summary, write_summary_csv
from mlps_dist.slides.stitch import (
    SlideGeometry,
    SlideModel,
    area_summary,
    class_map,
    geometry,
    merge_partials,
    probabilities,
)
from mlps_dist.slides.tissue import detect_tissue
from mlps_dist.slides.workkey import export_fingerprint, key_digest, run_fingerprint, work_key

WORK = ".work"


# ---------------------------------------------------------------- pass 1: tissue


def work_dir(out: Path, name: str) -> Path:
    return out / WORK / name


def prepare_slide(path: Path, out: Path, map_mpp: float, slide_mpp: float | None, digest: str = "", stain=None) -> None:
    """Tissue mask and thumbnail at the map resolution, the overlay's view of the slide
    (slides/overlay.py) and, with ``stain`` (a ``StainPlan``), the slide's stain estimate;
    reused only when the saved work has the same work key (slide file, settings, model:
    slides/workkey.py); otherwise the slide's work folder is emptied and everything is redone."""
    work = work_dir(out, slide_stem(path))
    (work / "bad.txt").unlink(missing_ok=True)
    if (work / "meta.json").is_file():
        try:
            if json.loads((work / "meta.json").read_text()).get("work_key") == digest:
                return
        except (OSError, ValueError, AttributeError):
            pass
    if work.is_dir():
        shutil.rmtree(work)  # made with other settings, another model or another slide file
    try:
        with Slide(path, slide_mpp) as slide:
            thumb = slide.read_scaled(map_mpp)
            meta = {
                "width": slide.width,
                "height": slide.height,
                "mpp": slide.mpp,
                "work_key": digest,
                "view_mpp": view_mpp(slide.width, slide.height, slide.mpp, map_mpp),
            }
            view = slide.read_scaled(meta["view_mpp"]) if meta["view_mpp"] < map_mpp else thumb
            tissue = detect_tissue(thumb, map_mpp)
            if stain is not None:
                meta["stain"] = stain.estimate(slide, tissue)
    except SlideError as exc:
        atomic_write_text(work / "bad.txt", str(exc))
        return
    atomic_write_bytes(work / "thumb.png", png.encode(thumb))
    atomic_write_bytes(work / "view.png", png.encode(view))
    atomic_write_bytes(work / "tissue.png", png.encode(tissue.astype(np.uint8) * 255))
    atomic_write_json(work / "meta.json", meta)


# ---------------------------------------------------------------- pass 2: tiles


def read_batches(slide: Slide, geo: SlideGeometry, origins, patch: int, batch: int, threads: int, stain=None):
    """Yield (origins, uint8 (N, 3, P, P)) in order, ``2 * threads`` batches read ahead;
    ``stain`` (a SlideStain) normalises them in the reading threads."""

    def read(chunk):
        tiles = np.stack([slide.read(x * geo.px0, y * geo.px0, geo.size0, patch).transpose(2, 0, 1) for x, y in chunk])
        return stain.tiles(tiles) if stain is not None else tiles

    chunks = [origins[i : i + batch] for i in range(0, len(origins), batch)]
    with ThreadPoolExecutor(threads) as pool:
        pending = [pool.submit(read, c) for c in chunks[: 2 * threads]]
        for i, chunk in enumerate(chunks):
            tiles = pending[i].result()
            if i + 2 * threads < len(chunks):
                pending.append(pool.submit(read, chunks[i + 2 * threads]))
            pending[i] = None  # drop the reference: memory stays at the read-ahead window
            yield chunk, tiles


def part_file(work: Path, digest: str, first: int, last: int) -> Path:
    return work / f"part-{digest}-{first:08d}-{last:08d}.npz"


def predict_share(
    model: SlideModel,
    slide_path: Path,
    geo: SlideGeometry,
    origins,
    first: int,
    last: int,
    out: Path,
    args,
    digest: str = "",
    progress: Progress | None = None,
) -> None:
    """Predict tiles [first, last) of a slide and save their weighted score sums (named by
    the work key, so a share made with other settings is never summed in). A run with
    stain normalisation and ``--stain-scope slide`` maps the tiles with the slide's
    estimate from pass 1 (meta.json) and the model's own per-tile estimate is skipped."""
    from mlps_dist.slides.stitch import Accumulator

    work = work_dir(out, geo.name)
    target = part_file(work, digest, first, last)
    if target.is_file() or (work / "bad.txt").is_file():
        return
    mine = origins[first:last]
    acc = Accumulator(len(model.classes), geo, mine)
    normaliser = getattr(model, "stain", None)
    stain = None
    if normaliser is not None and args.stain_scope == "slide":
        stain = SlideStain(normaliser, json.loads((work / "meta.json").read_text()).get("stain"))
    try:
        with Slide(slide_path, args.slide_mpp) as slide:
            for chunk, tiles in read_batches(slide, geo, mine, model.patch_size, args.batch_size, args.readers, stain):
                acc.add(model.scores(tiles, geo.n, stain=False) if stain else model.scores(tiles, geo.n), chunk)
                if progress is not None:
                    progress.update(len(chunk))
    except SlideError as exc:
        atomic_write_text(work / "bad.txt", str(exc))
        return
    buf = io.BytesIO()
    np.savez(buf, **acc.arrays())
    atomic_write_bytes(target, buf.getvalue())


def share_ranges(counts: list[int], world: int) -> list[list[tuple[int, int, int]]]:
    """Per rank, its (slide number, first, last) pieces of the global tile list."""
    flat = [(s, i) for s, n in enumerate(counts) for i in range(n)]
    out = []
    for rank in range(world):
        share = rank_share(flat, world, rank)
        pieces: dict[int, list[int]] = {}
        for s, i in share:
            pieces.setdefault(s, []).append(i)
        out.append([(s, idx[0], idx[-1] + 1) for s, idx in sorted(pieces.items())])
    return out


# ---------------------------------------------------------------- pass 3: outputs


def finish_slide(
    name: str,
    geo: SlideGeometry,
    ranges: list[tuple[int, int]],
    model: SlideModel,
    out: Path,
    args,
    tiles: int,
    key: dict | None = None,
) -> dict:
    work = work_dir(out, name)
    if (work / "bad.txt").is_file():
        return {"slide": name, "error": (work / "bad.txt").read_text()}
    partials = []
    for first, last in ranges:
        with np.load(part_file(work, key_digest(key), first, last)) as part:
            partials.append({k: part[k] for k in part.files})
    sums, weight = merge_partials(len(model.classes), geo, partials)
    tissue = png.decode(work / "tissue.png") > 0
    ignore = len(model.classes)
    classes = class_map(sums, weight, tissue, ignore)
    probs = probabilities(sums, weight)  # in place: the sums become the weighted mean scores
    del weight, partials
    meta = json.loads((work / "meta.json").read_text())
    areas = area_summary(classes, tissue, model.classes, geo.map_mpp)
    summary = {
        "slide": name,
        "width": geo.width,
        "height": geo.height,
        "mpp": geo.mpp,
        "map_mpp": geo.map_mpp,
        "classes": list(model.classes),
        **areas,
        "model_mpp": model.mpp,
        "tiles": tiles,
        "map_size": [geo.map_w, geo.map_h],
        "run": run_label(args),
        "checkpoint": checkpoint_label(args),
        "stain": stain_summary(model, meta, args),
    }
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    summary.update(
        write_slide_outputs(
            tmp,
            name,
            classes,
            probs,
            geo,
            model.classes,
            model.palette,
            view=png.decode(work / "view.png"),
            view_mpp=meta["view_mpp"],
            areas_mm2=areas["area_mm2"],
            simplify=args.simplify,
            min_region_um2=args.min_region_um2,
            with_probabilities=args.probabilities,
        )
    )
    summary.update(work_key=key_digest(key), work=key)
    atomic_write_bytes(tmp / "tissue.png", (work / "tissue.png").read_bytes())  # fsynced before the rename
    atomic_write_json(tmp / "summary.json", summary)
    final = out / name
    if final.exists():
        check_ours(final)
        shutil.rmtree(final)
    tmp.rename(final)  # the slide's outputs appear together or not at all
    fsync_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    return summary


OUTPUT_FILES = {
    "classes.png",
    "classes.tiff",
    "overlay.png",
    "tissue.png",
    "summary.json",
    "regions.geojson",
    "probabilities.tiff",
}


def finished(folder: Path, key: dict) -> bool:
    """The slide's outputs exist and were made from this slide file, settings and model."""
    try:
        return json.loads((folder / "summary.json").read_text()).get("work_key") == key_digest(key)
    except (OSError, ValueError, AttributeError):
        return False


def check_ours(folder: Path) -> None:
    """Refuse to replace a folder that is not a slide's outputs written by this tool."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else {folder.name}
    if not folder.is_dir() or "summary.json" not in names or not names <= OUTPUT_FILES:
        raise InputError(
            f"{folder} exists and was not written by segment_slides (it holds {sorted(names)[:5]}); "
            f"it is left alone: move it, or choose another --out"
        )


# ---------------------------------------------------------------- entry point


MAP_BYTES_PER_PIXEL = 215  # measured peak per map pixel: shares, npz buffers, merged sums, argmax, overlay


def check_map_size(dims: dict[str, tuple[int, int, float]], map_mpp: float, max_gb: float) -> None:
    """Before any work: a map finer than a slide's own pixels, or one whose pass 3 would need
    more than ``max_gb`` of memory, is refused with the --map-mpp that would do."""
    for name, (width, height, mpp) in sorted(dims.items()):
        if map_mpp < mpp * 0.999:
            raise InputError(
                f"--map-mpp {map_mpp:g}: finer than the {mpp:g} um/px of slide {name}'s own pixels "
                f"(nothing to gain, {(mpp / map_mpp) ** 2:.1f}x the memory); use --map-mpp {mpp:g} "
                f"or coarser"
            )
        map_w, map_h = width * mpp / map_mpp, height * mpp / map_mpp
        need_gb = map_w * map_h * MAP_BYTES_PER_PIXEL / 1e9
        if need_gb > max_gb:
            fits = mpp * (width * height * MAP_BYTES_PER_PIXEL / (max_gb * 1e9)) ** 0.5
            raise InputError(
                f"--map-mpp {map_mpp:g}: the map of slide {name} ({map_w:.0f} x {map_h:.0f} px) needs "
                f"about {need_gb:.1f} GB of memory, more than --max-map-gb {max_gb:g}; use --map-mpp "
                f"{fits * 1.01:.3g} or coarser, or raise --max-map-gb"
            )


def check_slides(
    paths: list[Path], slide_mpp: float | None, dims: dict | None = None
) -> tuple[dict[str, Path], dict[str, str]]:
    """Open every slide header first: a slide without MPP stops the run before any work.
    ``dims`` (when given) receives each readable slide's (width, height, mpp)."""
    good, bad, no_mpp = {}, {}, []
    for path in paths:
        try:
            with Slide(path, slide_mpp) as slide:
                if dims is not None:
                    dims[slide_stem(path)] = (slide.width, slide.height, slide.mpp)
            good[slide_stem(path)] = path
        except SlideError as exc:
            if "microns per pixel" in str(exc):
                no_mpp.append(str(path))
            else:
                bad[slide_stem(path)] = str(exc)
    if no_mpp:
        raise InputError(
            f"slide(s) without microns per pixel: {no_mpp}; pass --slide-mpp with the scanner's resolution "
            f"or remove them"
        )
    return good, bad


class OneProcess:
    """The process group of a torch-free run (``--model``): rank 0 of 1."""

    def init(self, backend: str = "auto") -> None:
        pass

    def teardown(self) -> None:
        pass

    def get_world_size(self) -> int:
        return 1

    def get_rank(self) -> int:
        return 0

    def is_main(self) -> bool:
        return True

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        return [obj]


def area_average(scores: np.ndarray, size: int) -> np.ndarray:
    """(N, C, P, P) -> (N, C, size, size): the mean over each output pixel's input area
    (as torch's adaptive average pooling, which the run-backed model uses)."""
    p = scores.shape[-1]
    if p == size:
        return scores
    edges = [(i * p // size, -(-(i + 1) * p // size)) for i in range(size)]
    rows = np.stack([scores[:, :, a:b].mean(axis=2) for a, b in edges], axis=2)
    return np.stack([rows[..., a:b].mean(axis=3) for a, b in edges], axis=3).astype(np.float32)


class ExportedSlideModel:
    """An exported model (mlps_dist.deploy.onnx_model.OnnxModel) behind the SlideModel interface."""

    def __init__(self, path: str):
        from mlps_dist.deploy.onnx_model import OnnxModel

        self.model = OnnxModel(path)
        self.classes, self.palette = list(self.model.classes), self.model.palette
        self.mpp, self.patch_size = self.model.mpp, int(self.model.patch_size)
        self.stain = self.model.stain  # the run's stain reference (None: off)

    def scores(self, tiles: np.ndarray, out_size: int, stain: bool = True) -> np.ndarray:
        return area_average(self.model.scores(np.ascontiguousarray(tiles), stain=stain), out_size)


def build_model(args, group) -> SlideModel:
    if args.model:
        model = ExportedSlideModel(args.model)
        model.fingerprint = export_fingerprint(args.model)
        if not model.mpp and args.model_mpp:
            model.mpp = float(args.model_mpp)
    else:
        from mlps_dist.predict.slide_model import create_slide_model

        model = create_slide_model(
            args.run,
            args.model_mpp,
            checkpoint=args.checkpoint,
            gate=False if args.no_gate else None,
            device=group.device(),
        )
        model.fingerprint = run_fingerprint(args.run, args.checkpoint, False if args.no_gate else None)
    if not model.mpp:
        raise InputError(
            f"{args.model or args.run}: the model does not record the microns per pixel it was trained "
            f"at (no 'mpp' in its shards' info.json or model.json); pass --model-mpp"
        )
    return model


def run(args, model: SlideModel | None = None, group=None) -> int:
    """Segment the slides into ``args.out``: checked against the inputs, claimed and locked
    first (mlps_dist/core/toolout.py), so no slide folder or output of another run is touched."""
    from mlps_dist.core.toolout import tool_output

    if group is None:
        from mlps_dist import dist as group
    with tool_output(
        args.out, args.slides, "segment_slides", group, owned_if=("summary.csv", WORK), in_flag="--slides"
    ):
        return _run(args, model, group)


def _run(args, model: SlideModel | None, group) -> int:
    out = Path(args.out)
    paths = list_slides(args.slides)
    dims: dict[str, tuple[int, int, float]] = {}
    good, bad = check_slides(paths, args.slide_mpp, dims)
    check_map_size(dims, args.map_mpp, args.max_map_gb)
    dist = group
    model = model or build_model(args, group)
    start = time.perf_counter()  # after start-up and model loading: the slide work itself
    world, rank = dist.get_world_size(), dist.get_rank()
    stride = args.stride or max(1, model.patch_size // 2)
    settings = {
        "map_mpp": args.map_mpp,
        "slide_mpp": args.slide_mpp,
        "stride": stride,
        "patch_size": model.patch_size,
        "model_mpp": model.mpp,
        "classes": list(model.classes),
        "simplify": args.simplify,
        "min_region_um2": args.min_region_um2,
        "probabilities": args.probabilities,
    }
    normaliser = getattr(model, "stain", None)
    stain_plan = None
    if normaliser is not None:  # only a run with stain normalisation has its scope in the key
        settings["stain_scope"] = args.stain_scope
        if args.stain_scope == "slide":
            stain_plan = StainPlan(normaliser, model, args.map_mpp, stride)
    fingerprint = getattr(model, "fingerprint", None) or type(model).__name__
    keys = {n: work_key(p, settings, fingerprint) for n, p in good.items()}
    pending = {n: p for n, p in good.items() if not finished(out / n, keys[n])}
    sizes = {n: p.stat().st_size for n, p in pending.items()}
    mine = balanced_slides(sizes, world, rank)
    tissue_progress = Progress(f"segment_slides{rank_tag(rank, world)}: tissue", len(mine), "slides", enabled=rank == 0)
    for name in mine:
        prepare_slide(pending[name], out, args.map_mpp, args.slide_mpp, key_digest(keys[name]), stain_plan)
        tissue_progress.update()
    tissue_progress.close()
    dist.barrier()
    plans = []
    for name in sorted(pending):
        work = work_dir(out, name)
        if (work / "bad.txt").is_file() or not (work / "meta.json").is_file():
            bad[name] = (work / "bad.txt").read_text() if (work / "bad.txt").is_file() else "tissue pass failed"
            continue
        meta = json.loads((work / "meta.json").read_text())
        geo = geometry(
            name, meta["width"], meta["height"], meta["mpp"], args.map_mpp, model.patch_size, model.mpp, stride
        )
        if geo.n < 4:
            raise InputError(
                f"--map-mpp {args.map_mpp}: a {model.patch_size} px tile at {model.mpp} um/px covers "
                f"only {geo.n} map pixels; use a --map-mpp of at most {model.patch_size * model.mpp / 4:g}"
            )
        plans.append((name, geo, geo.origins(png.decode(work / "tissue.png") > 0)))
    shares = share_ranges([len(o) for _, _, o in plans], world)
    todo = [
        (s, first, last)
        for s, first, last in shares[rank]
        if not part_file(work_dir(out, plans[s][0]), key_digest(keys[plans[s][0]]), first, last).is_file()
    ]
    everyone = sum(len(o) for _, _, o in plans)
    tile_progress = Progress(
        f"segment_slides{rank_tag(rank, world)}: tiles" + (f" (this rank's share of {everyone})" if world > 1 else ""),
        sum(last - first for _, first, last in todo),
        "tiles",
        enabled=rank == 0,
    )
    for s, first, last in todo:
        name, geo, origins = plans[s]
        predict_share(model, pending[name], geo, origins, first, last, out, args, key_digest(keys[name]), tile_progress)
    tile_progress.close()
    dist.barrier()
    done = []
    for number, (name, geo, origins) in enumerate(plans):
        if number % world != rank:
            continue
        ranges = [(first, last) for pieces in shares for s, first, last in pieces if s == number]
        started = time.perf_counter()
        result = finish_slide(name, geo, ranges, model, out, args, len(origins), keys[name])
        if "error" in result:
            bad[name] = result["error"]
        else:
            print(
                f"segment_slides{rank_tag(rank, world)}: {name} written ({len(origins)} tiles, "
                f"{sum(result['regions'].values())} regions) in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        done.append(name)
    bad = {k: v for share in dist.all_gather_object(bad) for k, v in share.items()}
    if dist.is_main():
        write_summary_csv(
            out, sorted(slide_stem(p) for p in paths), bad, model.classes, run_settings(args, settings, fingerprint)
        )
        for name in sorted(bad):
            print(f"slide failed: {name}: {bad[name]}", file=sys.stderr)
        ok = len(paths) - len(bad)
        print(
            f"segmented {ok} of {len(paths)} slide(s) into {out} in {time.perf_counter() - start:.2f} s "
            f"(summary: {out / 'summary.csv'})"
        )
    dist.barrier()
    return EXIT_SOME_FAILED if bad else 0


def rank_tag(rank: int, world: int) -> str:
    return f" [rank {rank}/{world}]" if world > 1 else ""


def segment(args) -> int:
    """Segment ``args.slides`` into ``args.out`` (``mlps segment``: the flags are
    mlps_dist/cli/segment.py's): one process without torch with ``--model``, else every rank
    of the process group (torchrun) its share. Returns the exit status (3: some slides failed)."""
    if args.model and (args.no_gate or args.checkpoint != "best"):
        raise InputError(
            "--no-gate and --checkpoint apply to --run; an exported model has its gate and checkpoint "
            "fixed by mlps export (export again to change them)"
        )
    if args.model:
        group = OneProcess()  # one process, no torch
    else:
        from mlps_dist import dist as group
    group.init("auto")
    try:
        return run(args, group=group)
    finally:
        group.teardown()
