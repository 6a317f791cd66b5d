"""The one way every entry point turns exceptions into messages and exit statuses.

    def main(argv=None) -> int:
        return runner.run(_main, argv)

``_main(argv) -> int`` does the work. What leaves it decides the exit status on every
rank alike:

    MlpsError (ConfigError, ShardError, ...)  one line "error: <message>" on stderr, exit 2
    Preempted                                  one line, exit 75 (rerun the same command)
    KeyboardInterrupt                          exit 130
    OSError: disk full, quota, read-only       one line naming the file and the cause, exit 2
    anything else                              the traceback, exit 1 (a defect, not an input)

The rank that found the problem prints it, whichever rank that is: ranks other than 0
prefix their number ("error (rank 3): ..."), so a bad file seen by one worker of a
multi-node job is not lost behind torchrun's bare "exit 2".
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

from mlps_dist.core.errors import EXIT_PREEMPTED, MlpsError, Preempted

EXIT_DEFECT = 1
EXIT_INTERRUPTED = 130
# Errors of the storage, not of the program: the user frees space or picks another folder.
STORAGE_ERRNOS = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space within your quota",
    errno.EROFS: "choose a writable folder",
}


def storage_error(exc: BaseException) -> str:
    """The one-line message of a full disk / quota / read-only file system, "" otherwise."""
    while exc is not None and not (isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return ""
    where = f"{exc.filename}: " if exc.filename else ""
    return (
        f"{where}{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}); its temporary files were removed; "
        f"{STORAGE_ERRNOS[exc.errno]} (or choose another output folder) and rerun the same command"
    )


def _rank() -> int:
    # mlps_dist.dist (and torch with it) is loaded by every distributed entry point; light
    # commands (artifacts status) that never load it run as one process, rank 0.
    dist = sys.modules.get("mlps_dist.dist")
    return dist.get_rank() if dist is not None else 0


def _who() -> str:
    rank = _rank()
    return f" (rank {rank})" if rank else ""


def report(exc: BaseException) -> int:
    """Print ``exc`` the house way and return the exit status it maps to."""
    quiet = getattr(exc, "shared", False) and _rank() != 0  # rank 0 says it for all
    if isinstance(exc, Preempted):
        if not quiet:
            print(f"preempted{_who()}: {exc}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if isinstance(exc, MlpsError):
        if not quiet:
            print(f"error{_who()}: {exc}", file=sys.stderr, flush=True)
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        print(f"interrupted{_who()}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    storage = storage_error(exc) if isinstance(exc, Exception) else ""
    if storage:
        print(f"error{_who()}: {storage}", file=sys.stderr, flush=True)
        return 2
    print(f"internal error{_who()} (please report it with the traceback):", file=sys.stderr)
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.flush()
    return EXIT_DEFECT


def record_status(status: int) -> int:
    """Under launch/stage.sh (``MLPS_STATUS_DIR`` set), leave a failing rank's status in
    ``MLPS_STATUS_DIR/rank-<R>``: torchrun reports every worker failure as 1, and the
    launcher hands on the workers' own status (2, 75) from these files."""
    folder = os.environ.get("MLPS_STATUS_DIR", "")
    if folder and status:
        try:
            with open(os.path.join(folder, f"rank-{_rank()}"), "w") as f:
                f.write(f"{status}\n")
        except OSError:
            pass
    return status


def run(body: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``body(argv)`` and map its outcome to an exit status (0 when it returns None)."""
    return record_status(_run(body, argv))


def _run(body: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        status = body(argv)
    except SystemExit as exc:  # argparse --help / usage errors keep their own status
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else (print(code, file=sys.stderr) or 2))
    except BaseException as exc:  # noqa: BLE001 - this is the one place that maps them all
        return report(exc)
    return 0 if status is None else int(status)


def entry(body: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Decorator form: ``@runner.entry`` over ``def main(argv=None)``."""

    def main(argv: list[str] | None = None) -> int:
        return run(body, argv)

    main.__doc__, main.__name__, main.__wrapped__ = body.__doc__, body.__name__, body
    return main
