"""One job at a time in a folder (a run directory, a tool's output folder): ``FOLDER/.lock``.

    lock = RunLock(folder, "classifier"); lock.acquire() ... lock.release()
    (the collective form for a run directory: mlps_dist.run.lock.run_lock)

Rank 0 creates ``RUN/.lock`` exclusively (O_EXCL) and writes who holds it: host, pid,
process start time, SLURM job, what runs. A second launch on the same run directory (a
double submit, or a torchrun whose launcher was killed still running) is refused with
those details instead of resuming from the first one's in-flight checkpoint.

``.lock`` appears complete or not at all (written aside, then hard-linked into place). A
lock whose holder is gone is taken over: on the same host when the pid is dead (or now
belongs to another process, told apart by its start time); from another host when the
holder has not refreshed the file's mtime (a heartbeat thread does it every 30 s) for
``MLPS_LOCK_STALE_S`` seconds (default 600). Takeover renames the stale file away and
checks that the file renamed is the one judged stale, so two takers cannot both win.

A ``.lock`` that holds no record of ours (empty, garbled, another program's file) was never
written by a live holder (ours appear complete), so it is judged by its owner and age: one
owned by this user and older than ``DAMAGED_GRACE_S`` is taken over; a fresh one, or one of
another user, is refused with a message that says so (not as a holder with no details).

The tools (make_shards, tile_slides, segment_slides, infer) take the same lock on their
output folder (mlps_dist/core/toolout.py). The module needs no torch: the SLURM job is read
through mlps_dist.dist only where a process has loaded it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import fsync_dir

HEARTBEAT_S = 30.0
DAMAGED_GRACE_S = 2 * HEARTBEAT_S  # an unreadable lock younger than this is refused


LOCK_NAME = ".lock"


class RunLockedError(MlpsError):
    """Another live job holds the run directory."""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not start or not _start_time(pid) or _start_time(pid) == start


def _stale_after_s() -> float:
    return float(os.environ.get("MLPS_LOCK_STALE_S", "600"))


def _slurm_job() -> str:
    dist = sys.modules.get("mlps_dist.dist")  # loaded by every torch entry point; torch-free tools have none
    return dist.env().slurm_job_id if dist is not None else ""


def _is_record(holder) -> bool:
    return isinstance(holder, dict) and bool(holder.get("pid")) and bool(holder.get("host"))


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}{job}, running {holder.get('what')} "
        f"since {holder.get('since')}"
    )


class RunLock:
    def __init__(self, folder: str | Path, what: str):
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "start": _start_time(pid),
            "slurm_job": _slurm_job(),
            "what": self.what,
            "token": self.token,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _read(self) -> dict | None:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # damaged or foreign: judged by its owner and age (see _damaged)
        return record if isinstance(record, dict) else {}

    def _damaged(self) -> tuple[bool, str]:
        """(stale, why) for a lock file with no record of ours."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False, ""
        age = time.time() - st.st_mtime
        what = "empty" if st.st_size == 0 else "not a lock record of mlps-dist"
        if st.st_uid != os.getuid():
            return False, (
                f"{self.path} is {what} and belongs to another user (uid {st.st_uid}); ask them, or "
                f"delete it if no job of theirs is working in {self.path.parent}"
            )
        if age > DAMAGED_GRACE_S:
            return True, ""
        return False, (
            f"{self.path} is {what} ({age:.0f} s old); if no job is working in {self.path.parent}, "
            f"delete it (it is taken over once it is {DAMAGED_GRACE_S:.0f} s old)"
        )

    def _is_stale(self, holder: dict) -> bool:
        if not _is_record(holder):
            return self._damaged()[0]
        if holder.get("host") == socket.gethostname() and holder.get("pid"):
            return not _alive(int(holder["pid"]), str(holder.get("start", "")))
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > _stale_after_s()

    def _try_create(self) -> bool:
        """Write the record to a private file, then hard-link it to ``.lock``: the link
        fails when the lock exists, and a lock that exists is never empty or partial (a
        kill between create and write would leave one nobody could judge)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        with open(mine, "w") as f:
            json.dump(self._record(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(mine, self.path)
        except FileExistsError:
            return False
        finally:
            mine.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
        return True

    def _take_over(self, holder: dict) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it; try to create ours
        moved = None
        with contextlib.suppress(OSError, ValueError):
            moved = json.loads(aside.read_text())
        if holder and moved != holder:
            # We moved a lock another taker created in the meantime: put it back.
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        for _ in range(20):
            if self._try_create():
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None:
                continue
            if not self._is_stale(holder):
                if not _is_record(holder):
                    raise RunLockedError(self._damaged()[1] or f"{self.path} could not be judged; delete it")
                raise RunLockedError(
                    f"run directory {self.path.parent} is in use by another job ({describe(holder)}); wait for it "
                    f"to end or stop it, or use another run_dir. If that job is gone, delete {self.path}"
                )
            self._take_over(holder)
            time.sleep(0.05)
        raise RunLockedError(f"could not take {self.path}: other jobs keep taking it; use another run_dir")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        holder = self._read()
        if holder and holder.get("token") == self.token:  # never remove a lock taken over from us
            self.path.unlink(missing_ok=True)
