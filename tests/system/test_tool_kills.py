"""SIGKILL at random moments, then rerun: make_shards, tile_slides, segment_slides and infer
write byte for byte what an uninterrupted run writes (tools/fault_inject_tools.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trained_runs import make_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def inject(out: Path, command: list[str], kills: int = 3, seed: int = 0) -> dict:
    proc = subprocess.run(
        [
            PY,
            "tools/fault_inject_tools.py",
            "--out",
            str(out),
            "--kills",
            str(kills),
            "--seed",
            str(seed),
            "--",
            *command,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and report["ok"], report
    assert report["killed_at_s"], report  # at least one run was really killed mid-way
    print(report)
    return report


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mlps_dist.synthetic.patches import write_luad_layout
    from mlps_dist.synthetic.slides import write_synthetic_slide

    root = tmp_path_factory.mktemp("kills")
    write_luad_layout(root / "luad", train=300, val=20, test=20, size=48)
    for i in range(3):
        write_synthetic_slide(
            root / "slides" / f"s{i}.tiff", root / "ann" / f"s{i}.geojson", 768, 512, seed=i, cell_px=200
        )
    run = make_run(root / "run")
    return root, run


def test_make_shards_killed_and_rerun_is_identical(inputs, tmp_path):
    root, _ = inputs
    report = inject(
        tmp_path,
        [
            PY,
            "-m",
            "mlps_dist",
            "shards",
            "--layout",
            "luad",
            "--src",
            str(root / "luad"),
            "--out",
            "{out}",
            "--shard-size",
            "20",
        ],
        seed=1,
    )
    assert report["files"] > 30


def test_tile_slides_killed_and_rerun_is_identical(inputs, tmp_path):
    from mlps_dist.synthetic.slides import CLASS_MAP

    root, _ = inputs
    inject(
        tmp_path,
        [
            PY,
            "-m",
            "mlps_dist",
            "tile",
            "--slides",
            str(root / "slides"),
            "--out",
            "{out}",
            "--mpp",
            "2",
            "--tile",
            "32",
            "--annotations",
            str(root / "ann"),
            "--class-map",
            CLASS_MAP,
            "--shard-size",
            "50",
            "--split-ratios",
            "0.4,0.3,0.3",
        ],
        seed=2,
    )


def test_segment_slides_killed_and_rerun_is_identical(inputs, tmp_path):
    root, run = inputs
    inject(
        tmp_path,
        [
            PY,
            "-m",
            "mlps_dist",
            "segment",
            "--run",
            str(run),
            "--slides",
            str(root / "slides"),
            "--out",
            "{out}",
            "--map-mpp",
            "8",
            "--model-mpp",
            "2",
            "--stride",
            "16",
        ],
        seed=3,
    )


def test_infer_killed_and_rerun_is_identical(inputs, tmp_path):
    root, run = inputs
    inject(
        tmp_path,
        [
            PY,
            "-m",
            "mlps_dist",
            "infer",
            "--run",
            str(run),
            "--input",
            str(root / "luad" / "val" / "img"),
            "--out",
            "{out}",
        ],
        seed=4,
    )


def test_infer_streaming_by_row_bands_killed_and_rerun_is_identical(inputs, tmp_path):
    """The streamed path (every image by row bands; the slides are tiled TIFFs read by rows of
    tiles) writes through its own temporary files: a kill leaves none behind as output."""
    root, run = inputs
    inject(
        tmp_path,
        [
            PY,
            "-m",
            "mlps_dist",
            "infer",
            "--run",
            str(run),
            "--input",
            str(root / "slides"),
            "--out",
            "{out}",
            "--stream-megapixels",
            "0",
            "--patch",
            "64",
        ],
        seed=5,
    )
