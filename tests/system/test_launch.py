"""launch/stage.sh and launch/pipeline.sh (thin wrappers of mlps stage and mlps pipeline) as a
user runs them: real torchrun, two processes over gloo on the tiny shards. Also: the paper
configs load, bad input fails fast."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from tiny_configs import tiny_config

from mlps_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]


def launch(script: str, *args: str, log_name: str = "", **env: str) -> subprocess.Popen:
    """A launcher detached from pytest (setsid: the test can clean up all of it); output in a file
    beside the run dir (the last argument) so a long run cannot block on a full pipe."""
    log = Path(args[-1]).with_suffix(f".{log_name or Path(script).stem}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(REPO / script), *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", **env},
            start_new_session=True,
        )
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, proc.log.read_text()


def events(run_dir: Path, stage: str, kind: str) -> list[dict]:
    log = run_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in records if r.get("stage") == stage and r.get("kind") == kind]


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, stage: str, step: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while True:
        steps = [e["global_step"] for e in events(run_dir, stage, "checkpoint")]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None or time.monotonic() > deadline:
            rc, out = finish(proc, 0)
            raise AssertionError(f"no {stage} checkpoint at step {step} (status {rc}):\n{out[-4000:]}")
        time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the fault-injection tool's own walk of /proc)."""
    return _fault_inject().descendants(pid)


def _fault_inject():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_inject", REPO / "tools" / "fault_inject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


# ---------------------------------------------------------------- fast checks


@pytest.mark.parametrize("name", ["luad", "bcss"])
def test_paper_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.classifier.model, cfg.segmenter.model) == ("resnet38d", "deeplabv3plus_resnet101")
    assert cfg.classifier.batch_size == 20 and cfg.segmenter.batch_size == 20
    assert cfg.masks.background.enabled == (name == "luad")


def test_stage_rejects_an_unknown_stage_and_a_missing_config(tmp_path):
    bad = subprocess.run(
        [str(REPO / "launch/stage.sh"), "clasifier", "configs/luad.yaml", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = [line for line in bad.stderr.splitlines() if not line.startswith("[venv]")]  # venv.sh's choice
    assert bad.returncode == 2 and len(said) == 1 and "unknown stage 'clasifier'" in said[0]
    missing = subprocess.run(
        [str(REPO / "launch/stage.sh"), "classifier", str(tmp_path / "no.yaml"), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no.yaml" in missing.stderr and "does not exist" in missing.stderr


def test_pipeline_checks_overrides_before_starting_any_stage(tmp_path, tiny_shards):
    config = tiny_config(tmp_path / "tiny.yaml", tiny_shards)
    done = subprocess.run(
        [str(REPO / "launch/pipeline.sh"), str(config), str(tmp_path / "run"), "classifier.epoch=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "classifier.epoch" in done.stderr and "classifier.epochs" in done.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real runs


@pytest.mark.slow
def test_elastic_restart_after_a_worker_is_killed_resumes_the_stage(tmp_path, tiny_shards):
    config = tiny_config(tmp_path / "tiny.yaml", tiny_shards, classifier_epochs=3)
    run_dir = tmp_path / "run"
    proc = launch("launch/stage.sh", "classifier", str(config), str(run_dir), MAX_RESTARTS="1")
    reached = wait_for_checkpoint(proc, run_dir, "classifier", step=2)
    workers = [
        p
        for p in descendants(proc.pid)
        if "mlps_dist.stages.train_classifier" in cmdline(p) and "torch.distributed.run" not in cmdline(p)
    ]
    assert len(workers) == 2, [cmdline(p) for p in workers]
    os.kill(workers[1], signal.SIGKILL)

    rc, out = finish(proc, timeout=300)
    assert rc == 0, out[-4000:]
    resumes = events(run_dir, "classifier", "resume")
    assert len(resumes) == 1 and resumes[0]["global_step"] >= reached, resumes
    steps = [e["global_step"] for e in events(run_dir, "classifier", "checkpoint")]
    assert max(steps) == 3 * 4  # 3 epochs of 32 samples / batch 8: every step was trained
    assert (run_dir / "classifier" / "model.pt").is_file()


@pytest.mark.slow
def test_pipeline_preempted_exits_75_and_the_rerun_skips_finished_stages_and_resumes(tmp_path, tiny_shards):
    config = tiny_config(tmp_path / "tiny.yaml", tiny_shards, segmenter_epochs=2)
    run_dir = tmp_path / "run"
    proc = launch("launch/pipeline.sh", str(config), str(run_dir))
    reached = wait_for_checkpoint(proc, run_dir, "segmenter", step=2, timeout=400)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher alone: it must pass the notice on
    rc, out = finish(proc, timeout=120)
    assert rc == 75, out[-4000:]
    assert (run_dir / "classifier" / "model.pt").is_file() and not (run_dir / "segmenter" / "model.pt").exists()

    proc = launch("launch/pipeline.sh", str(config), str(run_dir))
    rc, out = finish(proc, timeout=400)
    assert rc == 0, out[-4000:]
    rerun = out
    assert "classifier: finished" in rerun and "skipping" in rerun
    resumes = events(run_dir, "segmenter", "resume")
    assert len(resumes) == 1 and resumes[0]["global_step"] >= reached, resumes
    assert len(events(run_dir, "classifier", "resume")) == 0
    metrics = json.loads((run_dir / "metrics" / "test.json").read_text())
    table = rerun[rerun.index("test metrics (%)") :]
    assert f"{100 * metrics['miou']:.2f}" in table.split("miou")[1].split("\n")[0]
    assert "IoU TE" in table
    card = (run_dir / "MODEL_CARD.md").read_text()  # written when the pipeline finishes
    assert "## Results" in card and f"| **miou** | {100 * metrics['miou']:.2f} |" in card


@pytest.mark.slow
def test_two_nodes_meet_at_master_addr_without_slurm(tmp_path, tiny_shards):
    """Two launchers as two "nodes" on this host (NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT),
    one process each: one process group of 2 ranks trains the classifier."""
    config = tiny_config(tmp_path / "tiny.yaml", tiny_shards)
    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    nodes = [
        launch(
            "launch/stage.sh",
            "classifier",
            str(config),
            str(run_dir),
            log_name=f"node{rank}",
            NPROC_PER_NODE="1",
            NNODES="2",
            NODE_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RDZV_ID=f"test-{port}",
        )
        for rank in (0, 1)
    ]
    results = [finish(node, timeout=300) for node in nodes]
    for rc, out in results:
        assert rc == 0, out[-4000:]
    assert "2 node(s) x 1 process(es)" in results[0][1]
    assert "x 2 ranks" in results[0][1] + results[1][1]
    assert (run_dir / "classifier" / "model.pt").is_file()
