"""Launch real ``torchrun --standalone`` jobs from the tests and watch their run directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlps_dist.core.proctree import descendants

REPO = Path(__file__).resolve().parents[2]
# The interpreter's torchrun script, or its module where the script is elsewhere (a system
# python3 with torch: MLPS_PYTHON=python3 bash tools/gpu_check.sh).
_SCRIPT = Path(sys.executable).with_name("torchrun")
TORCHRUN = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def job_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra or {})}


def start(args: list[str], nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """A torchrun job in its own process group (so the test can kill all of it at once);
    ``env``: variables added to the job's environment."""
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args] if nproc else [sys.executable, *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=job_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(args: list[str], nproc: int = 2, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = start(args, nproc, env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = proc.stdout.read() if proc.stdout else ""
        kill_job(proc)
        raise AssertionError(f"job did not finish in {timeout} s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once. torchrun starts each worker in a session
    of its own, so killing torchrun's process group alone would leave the workers running."""
    for pid in descendants(proc.pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll ``condition()`` until true; fail with the job's output if the job ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"job ended (status {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            kill_job(proc)
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.05)


def latest_step(checkpoints: Path) -> int:
    """Global step of the committed checkpoint ``latest`` names, -1 if none."""
    try:
        return int((checkpoints / "latest").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


def load_weights(path: Path) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob.get("weights", blob.get("state_dict"))


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
