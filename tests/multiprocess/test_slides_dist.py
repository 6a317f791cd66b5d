"""Whole slides over real torchrun jobs (gloo): every tile exactly once on 1, 2 and 3 ranks,
the same shards and maps whatever the rank count, and a killed tiling run that resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchrun_helpers import REPO, kill_job, run, start, wait_for

from mlps_dist.synthetic.slides import CLASS_MAP, write_synthetic_slide

pytestmark = pytest.mark.slow
TILE = ["-m", "mlps_dist", "--", "tile"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    for i in range(4):
        write_synthetic_slide(
            root / "slides" / f"s{i}.tiff", root / "ann" / f"s{i}.geojson", 640, 448, seed=20 + i, cell_px=180
        )
    (root / "splits.csv").write_text("s0,train\ns1,train\ns2,val\ns3,test\n")
    return root


def tile_args(root: Path, out: Path) -> list[str]:
    return [
        *TILE,
        "--slides",
        str(root / "slides"),
        "--out",
        str(out),
        "--mpp",
        "2",
        "--tile",
        "32",
        "--annotations",
        str(root / "ann"),
        "--class-map",
        CLASS_MAP,
        "--splits",
        str(root / "splits.csv"),
        "--shard-size",
        "40",
    ]


def samples(out: Path) -> dict[str, list[tuple]]:
    from mlps_dist.data.shards import open_split

    info = json.loads((out / "info.json").read_text())
    result = {}
    for split in info["splits"]:
        reader = open_split(out, split)
        rows = []
        for i in range(len(reader)):
            member = reader.read(i)
            meta = json.loads(member["json"])
            rows.append((reader.key(i), meta["slide"], meta["x"], meta["y"], member["labels"], member["png"]))
        result[split] = rows
    return result


def test_tiling_writes_every_tile_once_on_1_2_3_ranks(slides, tmp_path):
    results = {}
    for nproc in (1, 2, 3):
        out = tmp_path / f"n{nproc}"
        proc = run(tile_args(slides, out), nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-3000:]
        results[nproc] = samples(out)
    reference = results[1]
    for split, rows in reference.items():
        places = [(slide, x, y) for _, slide, x, y, _, _ in rows]
        assert len(places) == len(set(places)) > 0
        assert [k for k, *_ in rows] == [f"{split}_{i:08d}" for i in range(len(rows))]
    assert results[2] == reference and results[3] == reference


def test_killed_tiling_resumes_without_redoing_finished_slides(slides, tmp_path):
    reference = tmp_path / "ref"
    assert run(tile_args(slides, reference), nproc=0).returncode == 0
    out = tmp_path / "out"
    proc = start(tile_args(slides, out), nproc=0)
    wait_for(lambda: len(list((out / ".parts").glob("*.json"))) >= 1, proc, "a finished slide")
    kill_job(proc)
    assert not (out / "info.json").exists()
    again = run(tile_args(slides, out), nproc=0)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "reused" in again.stdout
    assert samples(out) == samples(reference)


def test_segment_slides_killed_and_resumed_equals_2_ranks(slides, tmp_path):
    from trained_runs import make_run

    run_dir = make_run(tmp_path / "run")
    maps = {}
    command = lambda out: [  # noqa: E731
        "-m",
        "mlps_dist",
        "--",
        "segment",
        "--run",
        str(run_dir),
        "--slides",  # noqa: E731
        str(slides / "slides"),
        "--out",
        str(out),
        "--model-mpp",
        "8",
        "--map-mpp",
        "8",
        "--stride",
        "16",
    ]
    # The 1-rank result comes from a run killed once it saved its first scores, then rerun.
    first = start(command(tmp_path / "maps1"), nproc=0)
    wait_for(lambda: any((tmp_path / "maps1" / ".work").glob("*/part-*.npz")), first, "saved scores")
    kill_job(first)
    for nproc in (1, 2):
        out = tmp_path / f"maps{nproc}"
        proc = run(command(out), nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-3000:]
        maps[nproc] = {p.parent.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*/classes.png"))}
        tiles = {p.parent.name: json.loads(p.read_text())["tiles"] for p in out.glob("*/summary.json")}
        assert len(maps[nproc]) == 4 and all(t > 0 for t in tiles.values())
    for name, reference in maps[1].items():
        assert (maps[2][name] == reference).mean() > 0.999  # float sums in another order may flip a tie


def test_bench_slides_smallest(tmp_path):
    import os
    import subprocess

    import bench_common

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "tools/bench_slides.py",
            "--width",
            "512",
            "--height",
            "384",
            "--patch",
            "32",
            "--worlds",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = bench_common.check_lines(proc.stdout)
    figures = record["figures"]
    assert record["bench"] == "slides" and figures["segment_x1"]["tiles"] > 0 and figures["tile_x1"]["tiles"] > 0
    assert figures["hand_loop"]["tiles"] >= figures["segment_x1"]["tiles"]  # glass is skipped, tissue is not
    assert record["ratio"]["segment_x1_vs_hand"] > 0
