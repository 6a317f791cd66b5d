"""Failures of the machine, not the program, end in one line and exit 2: a full disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tool_runs import run_tool  # noqa: E402


@pytest.fixture
def full_disk(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_make_shards_on_a_full_disk_says_so_and_leaves_no_temporary_file(full_disk, tmp_path):
    from mlps_dist.synthetic.patches import write_luad_layout

    write_luad_layout(tmp_path / "src", train=60, val=6, test=6, size=64)
    out = full_disk / "shards"
    result = run_tool(
        "-m",
        "mlps_dist",
        "shards",
        "--layout",
        "luad",
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(out),
        "--shard-size",
        "20",
    )
    assert result.returncode == 2, result.stderr
    assert "No space left on device (ENOSPC)" in result.stderr and "Traceback" not in result.stderr
    assert str(out) in result.stderr
    assert not list(out.glob("*.tmp"))


def test_launch_stage_keeps_the_workers_exit_status_2(tmp_path):
    """torchrun reports a worker's exit 2 as 1; launch/stage.sh hands on the worker's own."""
    import os

    repo = Path(__file__).resolve().parents[2]
    config = tmp_path / "c.yaml"
    config.write_text("data: {root: nowhere}\n")
    proc = subprocess.run(
        [str(repo / "launch/stage.sh"), "evaluate", str(config), str(tmp_path / "run")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "a worker exited with status 2" in proc.stderr
    assert "error:" in proc.stderr


def test_atomic_writes_never_follow_a_link_planted_under_the_temporary_name(tmp_path):
    import os

    from mlps_dist.core.fileio import atomic_write_text
    from mlps_dist.core.fileio import tmp_path as temporary_name

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out" / "result.json"
    target.parent.mkdir()
    os.symlink(victim, temporary_name(target))
    atomic_write_text(target, "new")
    assert victim.read_text() == "precious" and target.read_text() == "new"
    assert not temporary_name(target).exists() and not os.path.islink(temporary_name(target))


def test_the_benchmark_reports_a_worker_that_died_without_a_traceback(tmp_path):
    """A worker killed by a signal (a C++ abort in gloo, the OOM killer) prints no Python
    traceback: the report names the signal and the worker's last words, not torchrun's
    own traceback."""
    import os

    repo = Path(__file__).resolve().parents[2]
    import bench_common
    import bench_train

    script = tmp_path / "w.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('worker 1: lost its peer', file=sys.stderr, flush=True)\n"
        "    os.abort()\n"
        "time.sleep(20)\n"
    )
    proc = subprocess.run(
        [*bench_common.torchrun_command(), "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode != 0
    report = bench_train.worker_error(proc.stdout + proc.stderr)
    assert "worker 1: lost its peer" in report and "SIGABRT" in report, report
    assert "ChildFailedError" not in report


def test_infer_on_a_full_disk_says_so_and_leaves_no_half_written_image(full_disk, tmp_path):
    import numpy as np
    from PIL import Image
    from trained_runs import make_run

    run = make_run(tmp_path / "run")
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i:02d}.png")
    out = full_disk / "pred"
    result = run_tool(
        "-m", "mlps_dist", "infer", "--run", str(run), "--input", str(tmp_path / "img"), "--out", str(out)
    )
    assert result.returncode == 2, result.stderr
    assert "No space left on device (ENOSPC)" in result.stderr and "Traceback" not in result.stderr
    classes = {p.stem for p in out.glob("*.png") if not p.stem.endswith("_overlay")}
    overlays = {p.stem[: -len("_overlay")] for p in out.glob("*_overlay.png")}
    assert classes == overlays and not list(out.glob("*.tmp"))
