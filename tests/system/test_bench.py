"""Smoke tests of the benchmark scripts: each runs at its smallest setting and prints one
JSON record with the machine, world size, figures and ratios (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tool_runs import REPO

import bench_common  # noqa: E402
import bench_train  # noqa: E402


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """A tools/ script in a fresh interpreter, one torch thread per process as tools/bench_all.sh runs them."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def record_of(proc: subprocess.CompletedProcess, bench: str) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = bench_common.check_lines(proc.stdout)  # exactly one line, every field present
    assert record["bench"] == bench
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"]
    assert (machine["gpu"] == "none") == (machine["gpu_count"] == 0)
    return record


def test_check_lines_names_what_is_wrong():
    good = bench_common.make_record("x", {"a": 1}, world_size=1, baseline="b", ratio={})
    assert bench_common.check_lines("\n" + json.dumps(good) + "\n")["figures"] == {"a": 1}
    with pytest.raises(ValueError, match="one JSON line"):
        bench_common.check_lines(json.dumps(good) + "\n" + json.dumps(good))
    with pytest.raises(ValueError, match="not a JSON line"):
        bench_common.check_lines("images/s: 12")
    with pytest.raises(ValueError, match="figures.*machine.gpu|machine.gpu"):
        broken = {k: v for k, v in good.items() if k != "figures"}
        broken["machine"] = {k: v for k, v in good["machine"].items() if k != "gpu"}
        bench_common.check_lines(json.dumps(broken))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--stages", "classifer"], "classifier, segmenter"),
        (["--parallel", "zero3"], "zero1"),
        (["--worlds", "1,two"], "rank counts"),
        (["--size", "16"], "32 px"),
    ],
)
def test_bench_train_rejects_bad_flags_before_any_work(tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main([*flags, "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert flags[0] in message and named in message
    assert not any(tmp_path.iterdir())  # nothing generated


def _ranks(images_per_s: list[float], peak: float) -> list[dict]:
    return [
        {
            "rank": r,
            "images": 10,
            "seconds": 10 / v,
            "waited": 0.5 / v,
            "step_s": 1 / v,
            "peak_mib": peak,
            "params_m": 1.0,
            "threads": 1,
        }
        for r, v in enumerate(images_per_s)
    ]


def test_summarise_ratios_come_from_the_runs_of_the_same_model():
    args = bench_train.parse_args(["--stages", "classifier", "--sizes", "small", "--parallel", "zero2"])
    runs = bench_train.plan_runs(args, (Path("shards"), Path("run")))
    names = [r["name"] for r in runs]
    assert names == [
        "classifier/small38/ddp/w1/torch",
        "classifier/small38/ddp/w2/torch",
        "classifier/small38/ddp/w2/dali",
        "classifier/small38/zero2/w2/torch",
    ]
    results = {
        names[0]: _ranks([10.0], 300),
        names[1]: _ranks([8.0, 7.0], 320),
        names[2]: _ranks([4.0, 4.0], 400),
        names[3]: _ranks([6.0, 6.0], 240),
    }
    _, ratio, _ = bench_train.summarise(runs, results, {})
    assert ratio["classifier/small38"]["zero2_vs_ddp"] == pytest.approx(12.0 / 14.0, abs=1e-3)
    assert ratio["classifier/small38"]["zero2_mem_vs_ddp"] == pytest.approx(240 / 320, abs=1e-3)
    del results[names[3]]
    figures, ratio, _ = bench_train.summarise(runs, results, {names[3]: "torchrun exited with 1"})
    assert figures["failed"] == {names[3]: "torchrun exited with 1"}  # reported, not dropped
    assert figures["runs"][names[1]]["images_per_s_total"] == pytest.approx(14.0)  # 20 images / slowest rank
    assert figures["runs"][names[1]]["data_wait"] == pytest.approx(0.05)
    got = ratio["classifier/small38"]
    assert got["scaling_efficiency_w2"] == pytest.approx(14.0 / (2 * 10.0), abs=1e-3)
    assert got["dali_vs_torch"] == pytest.approx(8.0 / 14.0, abs=1e-3)
    assert "zero2_vs_ddp" not in got  # its run failed: no ratio rather than a made-up one


def test_a_failed_job_is_reported_with_its_worker_error():
    log = (
        '[rank0]: Traceback (most recent call last):\n[rank0]:   File "w.py", line 2, in measure\n'
        "[rank0]:     step()\n[rank0]: RuntimeError: out of memory\nE1126 torchrun: failed\nRoot Cause: ...\n"
    )
    message = bench_train.worker_error(log)
    assert message.endswith("RuntimeError: out of memory") and "torchrun: failed" not in message


@pytest.mark.slow
def test_a_rank_that_dies_without_a_traceback_is_named_with_its_last_words(tmp_path):
    """A real 2-rank job whose rank 1 aborts (as a C++ abort would: no Python traceback): the
    failure names the rank, the signal and what the rank itself printed last (its own log)."""
    proc = run_script(
        "tools/bench_train.py", "--quick", "--worlds", "2", "--abort-rank", "1", "--workdir", str(tmp_path), timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = bench_common.check_lines(proc.stdout)["figures"]["failed"]["classifier/small38/ddp/w2/torch"]
    assert failed.startswith("torchrun exited with 1: rank 1 (exit code -6, Signal 6 (SIGABRT)"), failed
    assert "rank 1: aborting as asked" in failed and "ChildFailedError" not in failed, failed


def test_bench_loader_smallest(tmp_path):
    proc = run_script(
        "tools/bench_loader.py",
        "--n",
        "24",
        "--size",
        "32",
        "--batch",
        "4",
        "--steps",
        "2",
        "--workers",
        "1",
        "--image-formats",
        "png,jpeg",
        "--workdir",
        str(tmp_path),
        timeout=180,
    )
    record = record_of(proc, "loader")
    rates = record["figures"]["images_per_s"]
    assert set(rates) == {"baseline_png_folder", "torch", "dali", "torch_jpeg", "dali_jpeg"}
    assert all(v > 0 for v in rates.values())
    assert record["ratio"]["torch"] == pytest.approx(rates["torch"] / rates["baseline_png_folder"], rel=0.02)


def test_bench_masks_smallest():
    proc = run_script(
        "tools/bench_masks.py",
        "--size",
        "32",
        "--images",
        "4",
        "--reference-images",
        "1",
        "--batch-size",
        "4",
        timeout=180,
    )
    record = record_of(proc, "masks")
    figures = record["figures"]
    assert record["world_size"] == 1 and figures["fast_images_per_s"] > 0 and figures["reference_images_per_s"] > 0
    assert figures["equal_pixel_fraction"] >= 0.99  # the same masks as the reference, only faster
    assert record["ratio"]["speedup"] == pytest.approx(
        figures["fast_images_per_s"] / figures["reference_images_per_s"], rel=0.02
    )


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    """Real torchrun jobs: the small classifier under DDP on 1 and 2 ranks."""
    proc = run_script("tools/bench_train.py", "--quick", "--workdir", str(tmp_path), timeout=400)
    record = record_of(proc, "train")
    runs = record["figures"]["runs"]
    assert record["world_size"] == 2 and not record["figures"]["failed"]
    assert set(runs) == {"classifier/small38/ddp/w1/torch", "classifier/small38/ddp/w2/torch"}
    for name, run in runs.items():
        assert len(run["images_per_s_per_rank"]) == len(run["peak_mem_mib_per_rank"]) == run["world"], name
        assert all(v > 0 for v in run["images_per_s_per_rank"] + run["peak_mem_mib_per_rank"]), name
        assert 0 <= run["data_wait"] <= 1, name
    ratio = record["ratio"]["classifier/small38"]
    assert set(ratio) == {"scaling_efficiency_w2"}
    w1, w2 = runs["classifier/small38/ddp/w1/torch"], runs["classifier/small38/ddp/w2/torch"]
    assert ratio["scaling_efficiency_w2"] == pytest.approx(
        w2["images_per_s_total"] / (2 * w1["images_per_s_total"]), abs=0.01
    )
