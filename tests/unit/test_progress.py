"""mlps_dist.core.progress: plain lines off a terminal, a redrawn line on one, rate and ETA."""

import io

from mlps_dist.core.progress import Progress, format_duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_and_at_close():
    clock, out = Clock(), io.StringIO()
    progress = Progress("segment", total=100, unit="tiles", stream=out, every_s=30, clock=clock)
    for _ in range(50):
        clock.t += 1.0  # 1 tile/s: a line after 30 s, none before
        progress.update()
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0] == "segment: 30/100 tiles (30 %), 1.0 tiles/s, ETA 1m10s"
    assert lines[1].startswith("segment: 50/100 tiles (50 %)")
    assert "\r" not in out.getvalue()


def test_disabled_counts_without_printing():
    out = io.StringIO()
    progress = Progress("tile", total=3, stream=out, enabled=False)
    progress.update(3)
    progress.close()
    assert progress.done == 3 and out.getvalue() == ""


def test_terminal_redraws_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, out = Clock(), Tty()
    progress = Progress("shards", total=4, unit="samples", stream=out, clock=clock)
    for _ in range(4):
        clock.t += 0.5
        progress.update()
    progress.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("4/4 samples (100 %), 2.0 samples/s, 2s\n")
    assert text.count("\r") == 5


def test_format_duration():
    assert [format_duration(s) for s in (5, 187, 7500)] == ["5s", "3m07s", "2h05m"]


def test_wrap_counts_a_resumed_loop_and_an_unknown_total():
    clock, out = Clock(), io.StringIO()
    progress = Progress("classifier epoch 3", total=10, unit="steps", initial=6, stream=out, clock=clock)
    for _ in progress.wrap(range(6, 10)):
        clock.t += 2.0
    # the 6 steps done before the resume are counted, not timed: 4 steps in 8 s
    assert out.getvalue() == "classifier epoch 3: 10/10 steps (100 %), 0.5 steps/s, 8s\n"

    out = io.StringIO()
    for _ in Progress("masks", total=None, unit="batches", stream=out, clock=clock).wrap(range(3)):
        clock.t += 1.0
    assert out.getvalue() == "masks: 3 batches, 1.0 batches/s, 3s\n"
