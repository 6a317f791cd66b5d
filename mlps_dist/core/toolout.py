"""The output discipline of the tools (make_shards, tile_slides, segment_slides, infer).

    with tool_output(args.out, args.slides, "segment_slides", group, in_flag="--slides") as out:
        ...                                   # collective: every rank calls it

Before any work, on every rank: ``--out`` is not, does not hold and does not lie inside an
input (``outdirs.check_not_overlapping``). Rank 0 then claims the folder (a foreign non-empty
folder needs ``--force``; ``.mlps-output`` names the tool) and holds ``OUT/.lock``
(mlps_dist/run/lock.py) for the body, so a second run into the same folder is refused at once
with the holder's host and pid; a lock whose holder died is taken over. The refusal reaches
every rank.

Once the lock is held, the temporary files a killed run of a tool left (``NAME.PID.tmp``
of mlps_dist/core/fileio.py and the shard writer, whose process is gone) are removed, so a rerun
leaves exactly what an uninterrupted run does.

A tool deletes only what it wrote itself: ``Ledger`` keeps the names of the files a tool
committed in ``OUT/.mlps-written.json``; ``Ledger.remove_except(keep)`` deletes those (and
only those) that the new result does not keep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from mlps_dist.core.errors import InputError, MlpsError
from mlps_dist.core.fileio import atomic_write_json
from mlps_dist.core.outdirs import MARKER, check_not_overlapping, claim_output_dir, force_hint

LEDGER = ".mlps-written.json"


class _OneProcess:
    def is_main(self) -> bool:
        return True

    def all_gather_object(self, obj) -> list:
        return [obj]


def marker_tool(out: Path) -> str:
    """The tool named in ``OUT/.mlps-output`` ("" when absent or unreadable)."""
    try:
        return (Path(out) / MARKER).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


@contextlib.contextmanager
def tool_output(
    out: str | Path,
    inputs: list[str | Path],
    tool: str,
    group=None,
    force: bool | None = None,
    owned_if: tuple[str, ...] = (),
    in_flag: str = "--input",
) -> Iterator[Path]:
    """Check, claim and lock ``out`` for the body (see the module docstring)."""
    from mlps_dist.core.lock import RunLock, RunLockedError

    group = group or _OneProcess()
    out = Path(out)
    check_not_overlapping(out, inputs, in_flag=in_flag)
    lock, error = None, ""
    if group.is_main():
        try:
            other = marker_tool(out) if out.is_dir() else ""
            if other and other != tool and not force:
                raise InputError(
                    f"--out {out} holds the output of {other}; {tool} would mix its files with (or "
                    f"replace) those: choose another folder" + force_hint(force, "to write there anyway")
                )
            claim_output_dir(out, inputs, tool=tool, force=force, owned_if=owned_if, in_flag=in_flag)
            lock = RunLock(out, tool).acquire()
            remove_stale_temporaries(out)
        except RunLockedError as exc:
            error = (
                str(exc).replace("run directory", "output folder").replace("use another run_dir", "use another --out")
            )
        except MlpsError as exc:
            error = str(exc)
    error = group.all_gather_object(error)[0]
    if error:
        exc = InputError(error)
        exc.shared = True
        raise exc
    try:
        yield out
    finally:
        if lock is not None:
            lock.release()


_TMP = re.compile(r"\.(\d+)\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete ``*.PID.tmp`` files under ``out`` whose writing process is gone (a killed run's
    debris: the project's atomic writes and shard writers name their temporaries so)."""
    gone = []
    for path in Path(out).rglob("*.tmp"):
        match = _TMP.search(path.name)
        if match and path.is_file() and not path.is_symlink() and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone


class Ledger:
    """The files one tool wrote into ``out`` (names relative to it)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LEDGER

    def names(self) -> set[str]:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError):
            raise InputError(
                f"{self.path} is damaged; it lists the files this tool wrote into {self.out}: "
                f"delete the folder's outputs by hand, or choose a new --out"
            ) from None
        return {str(n) for n in record.get("files", [])} if isinstance(record, dict) else set()

    def add(self, names) -> None:
        """Record ``names`` before they are written (so a kill leaves them known)."""
        current = self.names()
        new = current | {str(n) for n in names}
        if new != current:
            atomic_write_json(self.path, {"files": sorted(new)})

    def remove_except(self, keep) -> list[str]:
        """Delete the recorded files not in ``keep``; returns the names deleted."""
        keep = {str(n) for n in keep}
        gone = []
        for name in sorted(self.names() - keep):
            path = self.out / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                continue  # never outside out
            path.unlink(missing_ok=True)
            gone.append(name)
        atomic_write_json(self.path, {"files": sorted(self.names() - set(gone))})
        return gone
