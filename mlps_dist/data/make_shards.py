"""Convert a LUAD-HistoSeg or BCSS-WSSS folder into shards (``mlps shards``; docs/architecture.md).

Every source file is decoded and checked before anything is written; problems are listed
with the file and what is wrong, and the conversion stops (exit 2) unless ``skip_bad``, in
which case the bad files are listed, counted and left out. Shards are committed atomically
and info.json is written last: after a crash the same call finishes the job, reusing the
shards that are already complete. The output folder is claimed and locked
(mlps_dist/core/toolout.py): a second conversion into it is refused.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

from mlps_dist.core.errors import InputError, MlpsError
from mlps_dist.core.outdirs import check_not_overlapping
from mlps_dist.core.toolout import tool_output
from mlps_dist.data.encoding import DEFAULT_JPEG_QUALITY
from mlps_dist.data.ingest import bad_counter, build_plan, summary_lines, write_plan
from mlps_dist.data.layouts import create_layout


def mixed_sizes(samples) -> str:
    """ "" when every sample has one size; else the sizes by count, with a file of the rarest."""
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


def check_settings(mpp: float | None, workers: int, image_quality: int) -> None:
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"--mpp {mpp}: must be a finite number > 0 (e.g. 0.5 for 20x)")
    if workers < 1:
        raise InputError(f"--workers {workers}: must be >= 1")
    if not 1 <= image_quality <= 100:
        raise InputError(f"--image-quality {image_quality}: use 1..100 (95 keeps stain detail)")


def make_shards(
    layout: str,
    src: str,
    out: str,
    *,
    shard_size: int = 1000,
    skip_bad: bool = False,
    allow_mixed_sizes: bool = False,
    workers: int = 1,
    mpp: float | None = None,
    image_format: str = "png",
    image_quality: int = DEFAULT_JPEG_QUALITY,
    force: bool = False,
    show_progress: bool = True,
) -> dict:
    """Check every file of ``src``, then write the shards and info.json into ``out``; returns
    info.json's content. Bad input raises InputError (exit 2) before anything is written."""
    check_settings(mpp, workers, image_quality)
    # Before any work: out must not be (inside) src, nor a foreign folder (write_plan deletes
    # info.json, *.tmp and {split}-*.tar/.idx that it does not plan to keep).
    check_not_overlapping(Path(out), [src], in_flag="--src")
    try:
        plan = build_plan(create_layout(layout), src, shard_size, workers, show_progress=show_progress)
    except ValueError as exc:
        if isinstance(exc, MlpsError):
            raise
        raise InputError(str(exc)) from exc
    if plan.bad:
        report_bad(plan.bad, skip_bad)
        if not skip_bad:
            raise InputError("nothing written; fix or remove these files, or pass --skip-bad")
    if not plan.splits.get("train"):
        raise InputError(f"{src}: no usable training patches")
    mixed = mixed_sizes(plan.splits["train"])
    if mixed and not allow_mixed_sizes:
        raise InputError(
            f"{src}: the training patches differ in size ({mixed}); the training and inference "
            f"scale is the patch size: resize or remove the odd ones, or pass --allow-mixed-sizes "
            f"(and set data.image_size)"
        )
    with tool_output(out, [src], "make_shards", force=force, owned_if=("info.json",), in_flag="--src"):
        return write_plan(
            plan,
            out,
            image_format=image_format,
            image_quality=image_quality,
            extra={"mpp": mpp} if mpp else None,
            show_progress=show_progress,
        )


def print_summary(info: dict, out: str) -> None:
    for line in summary_lines(info):
        print(line)
    print(f"wrote {Path(out) / 'info.json'}")
