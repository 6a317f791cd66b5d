"""A command run as a user runs it: a fresh interpreter of this environment, in the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``-m mlps_dist CMD ...`` (or a script of tools/) in a fresh interpreter of this venv."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
