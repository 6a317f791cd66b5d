"""tools/fault_inject.py, quick: the tiny pipeline SIGKILLed (the whole process tree, like
a node crash) at random moments, rerun to the end, gives the weights, pseudo masks and
test metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_configs import tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_random_kills_leave_the_results_identical(tmp_path, tiny_shards):
    config = tiny_config(tmp_path / "tiny.yaml", tiny_shards)
    out = tmp_path / "faults"
    done = subprocess.run(
        [
            sys.executable,
            "tools/fault_inject.py",
            "--config",
            str(config),
            "--out",
            str(out),
            "--kills",
            "2",
            "--seed",
            "3",
            "--min-gap",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"},
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    logs = "".join(p.read_text()[-3000:] for p in sorted(out.glob("*.log")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    assert report["killed"] >= 1, report  # at least one crash landed mid-run
    assert report["identical"] and set(report["compared"]) >= {
        "classifier/model.pt",
        "segmenter/model.pt",
        "pseudo_masks",
        "metrics/test.json",
    }, report
    # Every crash left the run lock of a dead process behind: the rerun took it over.
    assert not (out / "faulted" / ".lock").exists()
