"""Tile grids over a slide and the split of (slide, tile) work over ranks, each exactly once.

A grid is given in level-0 pixels: tiles of ``size0`` every ``stride0``, the first at
(0, 0), the last row/column the first one starting at or past the slide's edge minus a
tile (tiles may reach past the edge: OpenSlide pads with transparent = white glass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    slide: str  # slide name (file stem)
    index: int  # position in the slide's grid enumeration (row-major over kept tiles)
    x: int  # level-0 top-left
    y: int
    size0: float  # side in level-0 pixels


def grid_origins(length: int, size: float, stride: float) -> list[int]:
    """Starts (rounded to whole pixels) of tiles of ``size`` every ``stride`` covering ``range(length)``."""
    if length <= size:
        return [0]
    return [int(round(i * stride)) for i in range(math.ceil((length - size) / stride) + 1)]


def tile_grid(width: int, height: int, size0: float, stride0: float) -> list[tuple[int, int]]:
    """(x, y) level-0 origins, row-major."""
    return [(x, y) for y in grid_origins(height, size0, stride0) for x in grid_origins(width, size0, stride0)]


def rank_share(items: list, world: int, rank: int) -> list:
    """Contiguous balanced share of ``items`` for ``rank``; the shares of all ranks are a
    partition (every item in exactly one share)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in a world of {world}")
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (1 if rank < extra else 0)]


def balanced_slides(sizes: dict[str, int], world: int, rank: int) -> list[str]:
    """Slides for ``rank``: largest first to the least loaded rank (greedy), so one huge
    slide does not make one rank the straggler. Deterministic: every rank computes the
    same assignment."""
    load = [0] * world
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += max(1, sizes[name])
    return sorted(n for n, r in owner.items() if r == rank)
