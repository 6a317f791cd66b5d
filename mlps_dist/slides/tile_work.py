"""This rank's share of mlps tile: its slides tiled in ``workers`` processes, with
progress on stderr (mlps_dist/core/progress.py: done / total grid tiles, tiles/s, ETA; plain
lines every 30 s off a terminal).

    records = tile_my_slides(jobs, spec, out, workers=2, show_progress=dist.is_main())

Progress counts grid positions of the slides still to do (a slide an earlier run finished
is not counted): glass positions pass in microseconds and tissue tiles are read, encoded
and written, so the rate varies over a slide. Worker processes send their counts through a
queue to the parent, which alone writes the lines.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

from mlps_dist.core.errors import MlpsError
from mlps_dist.core.progress import Progress
from mlps_dist.slides.grid import balanced_slides
from mlps_dist.slides.reader import Slide, SlideError
from mlps_dist.slides.tiling import PARTS, SlideJob, TileSpec, finished_part, grid_size, tile_slide

_COUNTS = None  # the parent's queue, in a worker process


def _init_worker(counts) -> None:
    global _COUNTS
    _COUNTS = counts


def _send(n: int) -> None:
    _COUNTS.put(n)


def _tile_or_report(job: SlideJob, spec: TileSpec, out: str, on_tiles=None) -> dict:
    try:
        return tile_slide(job, spec, out, on_tiles=on_tiles or (_send if _COUNTS is not None else None))
    except MlpsError as exc:
        return {"bad": job.path, "error": str(exc)}


def _grid_total(jobs: list[SlideJob], spec: TileSpec) -> int:
    total = 0
    for job in jobs:
        try:
            with Slide(job.path, spec.slide_mpp) as slide:
                total += grid_size(slide.width, slide.height, slide.mpp, spec)
        except SlideError:
            pass  # reported when it is tiled
    return total


def tile_my_slides(
    jobs: list[SlideJob], spec: TileSpec, out: Path, workers: int, show_progress: bool = True
) -> list[dict]:
    from mlps_dist import dist  # torch: only where the ranks work together

    sizes = {j.path: Path(j.path).stat().st_size for j in jobs}
    world = dist.get_world_size()
    mine = [j for j in jobs if j.path in set(balanced_slides(sizes, world, dist.get_rank()))]
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    todo = [j for j in mine if finished_part(j, spec, out) is None]
    what = "tiling" + (f" (rank 0 of {world}, its slides)" if world > 1 else "")
    progress = Progress(what, _grid_total(todo, spec), "grid tiles", enabled=show_progress)
    try:
        if workers > 1 and len(todo) > 1:
            return _in_processes(mine, spec, str(out), min(workers, len(todo)), progress)
        return [_tile_or_report(j, spec, str(out), on_tiles=progress.update) for j in mine]
    finally:
        progress.close()


def _in_processes(jobs: list[SlideJob], spec: TileSpec, out: str, workers: int, progress: Progress) -> list[dict]:
    context = multiprocessing.get_context()
    counts = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(counts,)) as pool:
        futures = [pool.submit(_tile_or_report, j, spec, out) for j in jobs]
        pending = set(futures)
        while pending:
            pending = wait(pending, timeout=0.5)[1]
            _drain(counts, progress)
        results = [f.result() for f in futures]
    _drain(counts, progress)  # the workers have exited: everything they sent is readable
    return results


def _drain(counts, progress: Progress) -> None:
    while True:
        try:
            progress.update(counts.get_nowait())
        except queue_module.Empty:
            return
