"""Progress of a long command on stderr: done / total, rate and ETA.

On a terminal one line is redrawn in place (at most five times a second); anywhere else (a
SLURM log, a pipe, a CI log) a plain line is written every ``every_s`` seconds and at the end,
so a log shows the command alive without one line per item. Torch-free: the slide tools and
the deploy path use it.

    progress = Progress("segment", total=len(tiles), unit="tiles")
    for tile in tiles:
        ...
        progress.update()
    progress.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    """'42s', '3m07s', '2h05m': short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts items of one long task and reports them on ``stream``.

    ``enabled=False`` (a non-zero rank, a quiet flag) keeps the counting and prints nothing,
    so callers need no branches. ``total`` may be 0 (nothing to do: one closing line) or None
    (unknown: no share, no ETA). ``initial`` counts items done before (a resumed epoch): they
    are in the count, not in the rate."""

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "items",
        *,
        initial: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_s: float = 30.0,
        clock=time.monotonic,
    ):
        self.what, self.unit = what, unit
        self.total = None if total is None else int(total)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.every_s = every_s
        self.clock = clock
        self.done = self.initial = int(initial)
        self.start = clock()
        self._last = self.start
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self._closed = False

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        if self.total is None:
            return f"{self.what}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s, {format_duration(elapsed)}"
        share = f" ({100.0 * self.done / self.total:.0f} %)" if self.total else ""
        text = f"{self.what}: {self.done}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s"
        if self.done < self.total and rate > 0:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        elif self.done >= self.total:
            text += f", {format_duration(elapsed)}"
        return text

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yields the items of ``iterable``, counting each; the closing line once it is spent
        (a loop left early by an exception writes none: its error says more)."""
        for item in iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        interval = 0.2 if self.live else self.every_s
        if now - self._last >= interval:
            self._last = now
            self._emit(final=False)

    def close(self) -> None:
        """The closing line (always written when enabled, whatever the interval)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.live:
            self.stream.write("\r" + self.line() + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
