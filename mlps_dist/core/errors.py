"""The project's error base class and exit statuses, shared by every entry point.

Every error that a user can fix by changing an input (a config key, a file, a flag)
derives from ``MlpsError``; an entry point turns it into one line on stderr and exit
status ``EXIT_BAD_INPUT``. A stage that stopped to be resumed later (preemption signal)
exits with ``EXIT_PREEMPTED``; launchers and SLURM scripts requeue on that status only.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # the message names the file or key to change
EXIT_SOME_FAILED = 3  # a batch tool (segment_slides): some items failed and are named, the others are written
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written, rerun the same command to resume


class MlpsError(Exception):
    """An error the user can act on; ``str(exc)`` is the whole message (one line)."""

    exit_code = EXIT_BAD_INPUT
    # True when every rank raises the same error (e.g. found by a collective check): only
    # rank 0 prints it. False (default): whichever rank raises it prints it.
    shared = False


class InputError(MlpsError, ValueError):
    """A bad input file, folder or command-line value (the message names it)."""


class Preempted(MlpsError):
    """A stage stopped on a preemption signal after writing a checkpoint: rerun to resume."""

    exit_code = EXIT_PREEMPTED
    shared = True
