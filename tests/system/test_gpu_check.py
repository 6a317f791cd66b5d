"""tools/gpu_check.sh's reporting on the CPU: the environment first, SKIP/FAIL lines and the
summary with the log folder whatever happens, its own time-out per check, a clear exit status;
and the stages' imports on an environment without the optional packages (an offline GPU
node's image: no DeepSpeed, DALI, webdataset, tensorboard, tqdm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

import gpu_check  # noqa: E402


def test_without_cuda_it_prints_the_environment_every_check_and_exits_2(tmp_path):
    env = {**os.environ, "MLPS_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--quick", "--log-dir", str(tmp_path / "logs")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert lines[0] == "gpu_check: environment" and any(line.startswith("  torch     2.") for line in lines)
    assert any("driver" in line for line in lines[:6]) and any("DALI" in line for line in lines[:9])
    assert f"log folder {tmp_path / 'logs'}" in done.stdout
    assert "FAIL  setup      torch sees no CUDA device" in done.stdout
    for check in gpu_check.CHECKS:
        assert f"SKIP  {check.name:10} no CUDA device" in done.stdout
    assert lines[-1].startswith("gpu_check: no CUDA device: nothing checked") and "exit status 2" in lines[-1]
    assert "nothing installed" in done.stderr  # MLPS_PYTHON: no venv, no pip


def test_an_environment_that_cannot_be_prepared_is_a_setup_failure_with_the_environment(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLPS_PYTHON"}
    done = subprocess.run(
        ["bash", "tools/gpu_check.sh"],
        cwd=REPO,
        env={**env, "MLPS_TORCH": "cu99x"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "MLPS_TORCH=cu99x: use auto, cpu, cu126, cu128 or cu130" in done.stderr
    assert done.stdout.startswith("gpu_check: environment") and "FAIL  setup      tools/venv.sh" in done.stdout
    assert done.stdout.rstrip().endswith("nothing checked; exit status 2")


def _fake_env(**packages):
    return {
        "host": "h",
        "driver": "580.0",
        "python": sys.version,
        "torch": "2.x",
        "cuda_devices": 1,
        "gpus": ["FakeGPU (1 MiB)"],
        "packages": {"pytest": "9", "numpy": "2", "yaml": "6", "PIL": "1", **packages},
    }


def test_failures_time_outs_and_missing_packages_are_reported_and_the_rest_still_runs(tmp_path, monkeypatch, capsys):
    """With a (pretended) GPU: a check that hangs is killed at its own time-out with its child
    processes, a missing package is a SKIP, a failing check a FAIL, and the checks after them
    still run; one line each, then the summary and exit status 1."""
    pid_file = tmp_path / "child.pid"
    hang = (
        f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f" open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    bench = {
        "bench": "train",
        "figures": {
            "runs": {
                "classifier/resnet38d/ddp/w1/torch": {
                    "images_per_s_total": 210.5,
                    "step_s": 0.038,
                    "data_wait": 0.02,
                    "peak_mem_mib_per_rank": [13000.0],
                }
            },
            "failed": {},
        },
    }
    checks = (
        gpu_check.Check("hangs", "sleeps", 2, True, command=("{py}", "-c", hang)),
        gpu_check.Check("no-dali", "needs DALI", 30, True, command=("{py}", "-c", "pass"), requires=("nvidia.dali",)),
        gpu_check.Check("fails", "exits 3", 30, True, command=("{py}", "-c", "import sys; sys.exit(3)")),
        gpu_check.Check(
            "bench", "prints a record", 30, True, command=("{py}", "-c", f"print({json.dumps(json.dumps(bench))})")
        ),
        gpu_check.Check("tests", "the GPU tier without CUDA", 120, True, tests="nccl_ddp_gradient_on_one"),
    )
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    monkeypatch.setattr(gpu_check.gpu_check_env, "probe", lambda timeout: _fake_env())
    start = time.monotonic()
    status = gpu_check.main(["--log-dir", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert status == 1 and time.monotonic() - start < 100, out
    assert "FAIL  hangs      ran out of its 2 s" in out
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()
    assert "SKIP  no-dali    nvidia.dali not installed in this environment" in out
    assert "FAIL  fails      exit status 3" in out
    assert (
        "PASS  bench      classifier/resnet38d/ddp/w1/torch: 210.5 img/s, step 0.038 s, data wait 2.0%, "
        "peak 13000.0 MiB per rank" in out
    )
    assert "SKIP  tests      1 skipped | skipped: needs CUDA" in out  # pytest ran: torch sees no GPU here
    assert out.rstrip().splitlines()[-1].startswith("gpu_check: FAILED: hangs, fails;")
    assert (tmp_path / "logs" / "hangs.log").is_file() and (tmp_path / "logs" / "tests.xml").is_file()


def test_a_check_that_no_longer_fits_the_budget_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPU_CHECK_SECONDS", "10")
    monkeypatch.setattr(
        gpu_check,
        "CHECKS",
        (
            gpu_check.Check("late", "", 60, True, command=("{py}", "-c", "")),
            gpu_check.Check("slow", "", 60, False, command=("{py}", "-c", "")),
        ),
    )
    monkeypatch.setattr(gpu_check.gpu_check_env, "probe", lambda timeout: _fake_env())
    assert gpu_check.main(["--quick", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SKIP  late       no time left in the 10 s budget (GPU_CHECK_SECONDS)" in out
    assert "SKIP  slow       not in --quick (the full check runs it)" in out


OPTIONAL = (
    "numpy",
    "yaml",
    "PIL",
    "pytest",
    "scipy",
    "imagecodecs",
    "nvidia",
    "deepspeed",
    "webdataset",
    "tensorboard",
    "tqdm",
    "openslide",
    "shapely",
    "onnx",
    "onnxruntime",
    "tifffile",
)


def _with_only(modules: tuple, script: str) -> str:
    """``script`` run with every optional package outside ``modules`` absent, as on a node
    that lacks them (``find_spec`` says None: torch probes some of them that way)."""
    blocked = {m.split(".")[0] for m in OPTIONAL} - {m.split(".")[0] for m in modules}
    return f"""
import runpy, sys
class Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(blocked)!r}:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
sys.argv = {script.split()!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_gpu_speed_probe_reports_every_option_with_only_the_packages_its_check_requires(tmp_path):
    speed = next(c for c in gpu_check.CHECKS if c.name == "speed")
    probe = "tools/gpu_speed_probe.py --models small --size 32 --batch 2 --steps 1 --warmup 0"
    done = subprocess.run(
        [sys.executable, "-c", _with_only(speed.requires, probe)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    log = tmp_path / "speed.log"
    log.write_text(done.stdout)
    word, detail = gpu_check.bench_summary(log)
    assert word == "PASS" and detail.count("channels_last") == 2 and "small38 bf16 b2: none" in detail


BLOCKED = ("deepspeed", "nvidia", "webdataset", "tensorboard", "tqdm", "openslide", "shapely", "onnx", "onnxruntime")


@pytest.mark.slow
def test_the_stages_run_their_imports_and_write_shards_without_the_optional_packages(tmp_path):
    """An offline GPU node's image lacks these packages: the stages still import, shards and
    pseudo-mask chunks are written, and a run log works (no TensorBoard, no progress bar)."""
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked {{name}}")
sys.meta_path.insert(0, Block())
import mlps_dist.stages.train_classifier
import mlps_dist.stages.generate_masks
import mlps_dist.stages.train_segmenter
import mlps_dist.stages.evaluate
from mlps_dist.synthetic.patches import write_luad_layout
from mlps_dist.data.ingest import build_plan, write_plan
from mlps_dist.data.layouts import LUAD
from mlps_dist.data.shards import open_split
from mlps_dist.data.pseudo_masks import write_chunk
from mlps_dist.core import png
from mlps_dist.run.runlog import RunLog
import numpy as np
write_luad_layout({str(tmp_path / "luad")!r}, train=4, val=2, test=2, size=32, seed=0)
write_plan(build_plan(LUAD, {str(tmp_path / "luad")!r}, shard_size=4),
           {str(tmp_path / "shards")!r}, log=lambda *_: None)
reader = open_split({str(tmp_path / "shards")!r}, "train")
assert len(reader) == 4 and reader.read(0)["png"]
write_chunk({str(tmp_path)!r}, 0, [(reader.key(0), [png.encode_indices(np.zeros((32, 32), np.uint8))])], ["bn7"])
log = RunLog({str(tmp_path / "run")!r}, "classifier")
assert list(log.progress(range(3))) == [0, 1, 2]
log.close()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert "tensorboard is not installed" in done.stderr


def test_a_check_killed_mid_run_says_how_far_its_tests_got(tmp_path):
    log = tmp_path / "amp.log"
    log.write_text(
        "tests/system/test_gpu.py::a PASSED [ 20%]\ntests/system/test_gpu.py::b SKIPPED (x) [ 40%]\n"
        "tests/system/test_gpu.py::c PASSED [ 60%]\n"
    )
    assert gpu_check.progress(log) == ", after 2 passed, 1 skipped"
    assert gpu_check.progress(tmp_path / "none.log") == ""
