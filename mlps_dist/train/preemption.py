"""Preemption: SIGUSR1 or SIGTERM asks a training stage to checkpoint and stop.

    with PreemptionGuard() as guard:
        ... after each optimizer step:  if guard.poll(): save(); raise Preempted(...)

A signal only sets a flag; after the current optimizer step all ranks agree on it (a
vote summed over ranks), so every rank writes the same checkpoint and stops at the same
step. The stage then exits with ``core.errors.EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "rerun to
resume"), the status launchers and SLURM scripts requeue on.
"""

from __future__ import annotations

import signal

from mlps_dist import dist


class PreemptionGuard:
    """Turns SIGUSR1/SIGTERM into a flag that all ranks agree on at a step boundary."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.flag = False
        self._previous = {}
        self._vote: dist.Vote | None = None  # started by poll(), read by the next poll()

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.flag = True  # acted on after the current optimizer step

    def poll(self) -> bool:
        """Per-step check (collective, call on every rank at the same steps): True on every
        rank when any rank had been signalled by the previous call. The vote started here is
        read at the next call, so a step never waits for it; the stop comes one step later."""
        previous, self._vote = self._vote, None
        if previous is not None and previous.any():
            return True
        self._vote = dist.start_vote(self.flag)
        return False

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (collective; waits for the vote)."""
        if self._vote is not None:  # settle the per-step vote in flight; this one covers it
            self._vote.any()
            self._vote = None
        return dist.start_vote(self.flag).any()
