"""A launcher's child process and the signals meant for it (standard library only).

A preemption notice (SIGTERM, SIGUSR1 from SLURM), Ctrl-C (SIGINT) or a closed terminal
(SIGHUP) must reach torchrun, which passes it to the workers; they finish the step, write a
checkpoint and exit 75. The launcher turns every one of them into a single SIGTERM: the one
signal every layer treats as "checkpoint and stop", so Ctrl-C keeps the work done so far too.

The child runs in a session of its own and gets the first signal only: a signal sent to the
whole process group (Ctrl-C in a terminal) or a second one must not hit torchrun while it
waits for its workers to checkpoint (a second signal makes it stop waiting). Where every
process gets the signal from outside already (SLURM signals all processes of a job step),
``forward=False``: nothing is passed on twice, and the status is still read as a preemption.

Between children (before the first stage, between two stages) there is nothing to save: a
signal stops the launcher at once with 75, "rerun the same command to resume".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mlps_dist.core.errors import EXIT_PREEMPTED

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def log(message: str) -> None:
    """One launcher line on stderr, timed (SLURM logs interleave it with the workers')."""
    print(f"[launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Forwarder:
    """Install once, as the launcher's first act; then ``run`` each child through it."""

    def __init__(self, forward: bool = True):
        self.forward = forward
        self.child: subprocess.Popen | None = None
        self.starting = False  # between fork and knowing the child's pid
        self.pending = False  # a signal came while starting: pass it on once the pid is known
        self.preempted = False  # a signal came while the current (or last) child ran

    def install(self) -> Forwarder:
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.preempted:
            pid = self.child.pid if self.child else "the stage"
            log(
                f"received {name} again: still waiting for pid {pid} to checkpoint (kill -9 {os.getpid()} to stop "
                f"at once)"
            )
            return
        self.preempted = True
        if self.child is None and not self.starting:
            log(f"received {name} before the stage started: stopping (rerun to resume)")
            raise SystemExit(EXIT_PREEMPTED)
        if not self.forward:
            log(f"received {name}: the stage got it too and checkpoints before it stops")
        elif self.child is None:
            self.pending = True
        else:
            log(f"received {name}: asking pid {self.child.pid} to checkpoint and stop (SIGTERM)")
            self.child.send_signal(signal.SIGTERM)  # a no-op once the child has been reaped

    def run(self, command: list[str], env: dict[str, str] | None = None) -> int:
        """Run ``command`` to its end; its status (128 + N when signal N killed it, as a shell
        says), or 75 when a preemption signal arrived and it did not finish cleanly."""
        self.preempted = self.pending = False
        self.starting = True
        try:
            self.child = subprocess.Popen(command, env=env, start_new_session=True)
        finally:
            self.starting = False
        if self.pending:
            log(f"a signal arrived as pid {self.child.pid} started: asking it to checkpoint and stop (SIGTERM)")
            self.child.send_signal(signal.SIGTERM)
        try:
            status = self.child.wait()  # signals interrupt the wait, their handler runs, the wait goes on
        finally:
            self.child = None
        if status < 0:
            status = 128 - status
        if self.preempted and status != 0:
            log(f"stopped by a preemption signal (status {status}): rerun the same command to resume")
            status = EXIT_PREEMPTED
        return status
