"""The run directory's lock, taken by every rank together: rank 0 holds ``RUN/.lock``
(mlps_dist.core.lock.RunLock) for the body, and every rank raises RunLockedError when another
live job holds it.

    with run_lock(cfg.run_dir, "classifier"):      # collective: every rank calls it
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mlps_dist import dist
from mlps_dist.core.lock import RunLock, RunLockedError


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the run directory's lock for the body (collective; rank 0 holds the file).
    Every rank raises RunLockedError when it is held by another live job."""
    lock = RunLock(run_dir, what)
    error = ""
    if dist.is_main():
        try:
            lock.acquire()
        except RunLockedError as exc:
            error = str(exc)
    if dist.get_world_size() > 1:
        error = dist.broadcast_object(error)
    if error:
        exc = RunLockedError(error)
        exc.shared = True
        raise exc
    try:
        yield
    finally:
        if dist.is_main():
            lock.release()
