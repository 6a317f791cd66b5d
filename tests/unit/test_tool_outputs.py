"""The tools' output discipline: --out never an input, only their own files deleted, one run
per output folder, a damaged lock judged by its owner and age (mlps_dist/core/toolout.py, lock.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slide_fixtures import ColourModel  # noqa: E402

from mlps_dist.core.errors import InputError  # noqa: E402
from mlps_dist.core.lock import RunLock, RunLockedError  # noqa: E402
from mlps_dist.synthetic.slides import write_synthetic_slide  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
from mlps_dist.cli import tile as tile_slides  # noqa: E402


@pytest.fixture(scope="module")
def one_slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    write_synthetic_slide(root / "slides" / "s0.tiff", root / "ann" / "s0.geojson", 384, 256, seed=3, cell_px=100)
    return root


def segment(slides: Path, out: Path, *extra, model=None) -> int:
    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.deploy import segment_slides

    args = segment_cmd.parse_args(
        ["--run", "unused", "--slides", str(slides), "--out", str(out), "--map-mpp", "4", *extra]
    )
    return segment_slides.run(args, model=model or ColourModel())


def test_segment_slides_refuses_an_out_among_the_slides_and_keeps_a_mirax_folder(one_slide, tmp_path):
    slides = tmp_path / "s"
    (slides / "s0").mkdir(parents=True)
    (slides / "s0.tiff").write_bytes((one_slide / "slides" / "s0.tiff").read_bytes())
    (slides / "s0" / "Slidedat.ini").write_text("[GENERAL]\n")  # the MIRAX layout: X.mrxs + X/
    with pytest.raises(InputError, match="--out .* lies inside the input --slides"):
        segment(slides, slides)
    assert (slides / "s0" / "Slidedat.ini").read_text() == "[GENERAL]\n"
    # A same-named folder that is not this tool's output is never replaced.
    out = tmp_path / "out"
    (out / "s0").mkdir(parents=True)
    (out / "s0" / "notes.txt").write_text("mine")
    (out / ".mlps-output").write_text("segment_slides\n")
    with pytest.raises(InputError, match="not written by segment_slides"):
        segment(slides, out)
    assert (out / "s0" / "notes.txt").read_text() == "mine"
    # A run directory (no marker, not empty) is refused as a foreign folder.
    run = tmp_path / "run"
    (run / "classifier").mkdir(parents=True)
    (run / "classifier" / "model.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="not empty and was not written by segment_slides") as refused:
        segment(slides, run)
    assert "--force" not in str(refused.value)  # segment_slides has no such flag to offer
    assert (run / "classifier" / "model.pt").read_bytes() == b"x"


def test_tile_slides_deletes_only_what_it_wrote(one_slide, tmp_path):
    base = ["--slides", str(one_slide / "slides"), "--mpp", "2", "--tile", "32", "--split-ratios", "1,0,0"]
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"backup-2024.tar": "precious", "notes-v1.idx": "keep", "draft.tmp": "x", "info.json": "{}"}
    for name, text in files.items():
        (mine / name).write_text(text)
    assert tile_slides.main(base + ["--out", str(mine)]) == 2  # foreign and not empty: refused
    assert {p.name: p.read_text() for p in mine.iterdir()} == files
    assert tile_slides.main(base + ["--out", str(one_slide / "slides")]) == 2  # --out == --slides
    assert tile_slides.main(base + ["--out", str(mine), "--force"]) == 0
    for name in ("backup-2024.tar", "notes-v1.idx", "draft.tmp"):
        assert (mine / name).read_text() == files[name]
    assert json.loads((mine / "info.json").read_text())["layout"] == "slides"
    # A rerun with fewer shards removes its own surplus shard, nothing else.
    out = tmp_path / "out"
    assert tile_slides.main(base + ["--out", str(out), "--shard-size", "5"]) == 0
    count = len(list(out.glob("train-*.tar")))
    assert count > 1
    (out / "keep-000001.tar").write_text("someone else's")
    assert tile_slides.main(base + ["--out", str(out), "--shard-size", "100000"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["keep-000001.tar", "train-000000.tar"]
    assert not (out / ".lock").exists()


def test_a_second_run_into_one_output_folder_is_refused_at_once(one_slide, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from mlps_dist.core.lock import RunLock; "
            f"RunLock({str(out)!r}, 'tile_slides').acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / ".mlps-output").write_text("tile_slides\n")
        start = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlps_dist",
                "tile",
                "--slides",
                str(one_slide / "slides"),
                "--out",
                str(out),
                "--mpp",
                "2",
                "--tile",
                "32",
                "--split-ratios",
                "1,0,0",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 2, proc.stderr
        assert f"pid {holder.pid}" in proc.stderr and "use another --out" in proc.stderr
        assert time.monotonic() - start < 60
        with pytest.raises(InputError, match="holds the output of tile_slides"):
            segment(one_slide / "slides", out)
    finally:
        holder.kill()
        holder.wait()
    maps = tmp_path / "maps"
    held = RunLock(maps, "segment_slides").acquire()  # this live process holds it
    try:
        with pytest.raises(InputError, match=f"output folder {maps} is in use .*pid {os.getpid()}"):
            segment(one_slide / "slides", maps)
    finally:
        held.release()
    assert segment(one_slide / "slides", maps) == 0
    assert (
        tile_slides.main(
            [
                "--slides",
                str(one_slide / "slides"),
                "--out",
                str(out),
                "--mpp",
                "2",
                "--tile",
                "32",
                "--split-ratios",
                "1,0,0",
            ]
        )
        == 0
    )  # the dead holder's lock is taken over


def test_an_empty_or_foreign_lock_is_judged_by_owner_and_age(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("")
    with pytest.raises(RunLockedError, match=r"\.lock is empty \(0 s old\).*delete it") as err:
        RunLock(folder, "x").acquire()
    assert "None" not in str(err.value)
    (folder / ".lock").write_text("not json at all")
    with pytest.raises(RunLockedError, match="not a lock record of mlps-dist"):
        RunLock(folder, "x").acquire()
    old = time.time() - 120
    os.utime(folder / ".lock", (old, old))
    lock = RunLock(folder, "x").acquire()  # ours, unreadable and old: taken over
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_make_shards_into_a_folder_another_run_holds_is_refused(tmp_path):
    from mlps_dist.synthetic.patches import write_luad_layout

    write_luad_layout(tmp_path / "src", train=4, val=2, test=2, size=32)
    out = tmp_path / "shards"
    held = RunLock(out, "make_shards").acquire()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlps_dist",
                "shards",
                "--layout",
                "luad",
                "--src",
                str(tmp_path / "src"),
                "--out",
                str(out),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 2 and f"pid {os.getpid()}, running make_shards" in proc.stderr, proc.stderr
        assert not (out / "info.json").exists()
    finally:
        held.release()
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlps_dist",
                "shards",
                "--layout",
                "luad",
                "--src",
                str(tmp_path / "src"),
                "--out",
                str(out),
            ],
            cwd=REPO,
            capture_output=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        ).returncode
        == 0
    )
