"""The SLURM scripts on a real local cluster (tests/support/slurm_cluster.py): the whole pipeline on
one node (2 processes) and on two nodes (1 process each) through slurm/submit_pipeline.sh,
and a stage that is preempted by the USR1 notice, requeued and resumed from its checkpoint.

All jobs are submitted at once (each node claims 4 CPUs, so they run side by side), and
each test then waits for its own jobs by polling ``scontrol show job``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import ensure_installed, slurm_cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
STAGES = ["classifier", "masks", "segmenter", "evaluate"]


def tiny_config(path: Path, shards: Path, epochs: int) -> Path:
    """Small CPU models on the tiny shards; a checkpoint after every optimizer step."""
    train = {"epochs": epochs, "batch_size": 8, "lr": 0.01, "ckpt_every_steps": 1, "log_every_steps": 1}
    path.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "data": {"root": str(shards), "num_workers": 0, "image_size": 32},
                "classifier": {"model": "small38", "cam_images": 0, "pda": {"start_epoch": 1}, **train},
                "masks": {"batch_size": 8, "chunk_size": 8},
                "segmenter": {"model": "deeplabv3plus_small", "vis_images": 0, **train},
                "evaluate": {"batch_size": 4, "splits": ["test"]},
            }
        )
    )
    return path


def events(run_dir: Path, stage: str, kind: str) -> list[dict]:
    log = run_dir / "log.jsonl"
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("stage") == stage and r.get("kind") == kind]


def processes_mentioning(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (the launchers and workers of a run)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path) in (entry / "cmdline").read_text().replace("\0", " "):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def submit_pipeline(cluster, config: Path, run_dir: Path, *sbatch_opts: str) -> dict[str, int]:
    done = subprocess.run(
        [str(REPO / "slurm" / "submit_pipeline.sh"), str(config), str(run_dir), *sbatch_opts],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    jobs = dict(line.split() for line in done.stdout.splitlines())
    assert list(jobs) == STAGES, done.stdout
    return {stage: int(job) for stage, job in jobs.items()}


@pytest.fixture(scope="module")
def submitted(slurm_cluster, tiny_shards, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("slurm_runs")
    short = tiny_config(root / "short.yaml", tiny_shards, epochs=1)
    long = tiny_config(root / "long.yaml", tiny_shards, epochs=6)
    preempt_run = root / "preempt"
    (preempt_run / "slurm").mkdir(parents=True)
    job = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--cpus-per-task=1",
        f"--chdir={REPO}",
        f"--output={preempt_run}/slurm/%j.out",
        str(REPO / "slurm" / "stage.sbatch"),
        "classifier",
        str(long),
        str(preempt_run),
    ).stdout.strip()
    return {
        "preempt": (int(job), preempt_run),
        "one_node": (
            submit_pipeline(slurm_cluster, short, root / "one", "--nodes=1", "--cpus-per-task=2"),
            root / "one",
        ),
        "two_nodes": (
            submit_pipeline(slurm_cluster, short, root / "two", "--nodes=2", "--cpus-per-task=1"),
            root / "two",
        ),
    }


def test_preempted_stage_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, submitted):  # noqa: F811
    job, run_dir = submitted["preempt"]
    deadline = time.monotonic() + 240
    while not any(e["global_step"] >= 2 for e in events(run_dir, "classifier", "checkpoint")):
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm_cluster.job(job)
        assert time.monotonic() < deadline, "no classifier checkpoint in time"
        time.sleep(0.5)
    # What --signal=B:USR1@<seconds> does ahead of the time limit, sent now rather than
    # after a wait for the limit (SLURM checks time limits only every 30 s or so).
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    deadline = time.monotonic() + 120
    while True:
        info = slurm_cluster.job(job)
        if int(info["Restarts"]) >= 1 and info["JobState"] == "PENDING":
            break
        assert info["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), info
        assert time.monotonic() < deadline, f"job {job} was not requeued: {info}"
        time.sleep(0.5)
    # SLURM holds a requeued job for two minutes; let it start as soon as the first run's
    # processes are gone and its credential (revoked at 1 s resolution) is out of date.
    while processes_mentioning(run_dir):
        assert time.monotonic() < deadline, "the preempted run's processes did not end"
        time.sleep(0.5)
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    info = slurm_cluster.wait([job], timeout_s=240)[job]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info
    ends = [line for line in slurm_cluster.jobcomp().splitlines() if line.startswith(f"JobId={job} ")]
    assert len(ends) == 2 and "JobState=COMPLETED" not in ends[0] and "JobState=COMPLETED" in ends[1], ends

    saved_before = max(e["global_step"] for e in events(run_dir, "classifier", "checkpoint") if e["global_step"] >= 2)
    resumes = events(run_dir, "classifier", "resume")
    assert len(resumes) == 1 and resumes[0]["global_step"] >= 2, resumes
    assert resumes[0]["global_step"] <= saved_before
    assert (run_dir / "classifier" / "model.pt").is_file()
    log = next((run_dir / "slurm").glob("*.out")).read_text()
    assert "requeueing job" in log and f"job {job} (restart 1)" in log, log[-3000:]


@pytest.mark.parametrize("layout, nodes, procs_per_node", [("one_node", 1, 2), ("two_nodes", 2, 1)])
def test_pipeline_runs_to_test_metrics(slurm_cluster, submitted, layout, nodes, procs_per_node):  # noqa: F811
    jobs, run_dir = submitted[layout]
    infos = slurm_cluster.wait(list(jobs.values()), timeout_s=420)
    for stage, job in jobs.items():
        info, log = infos[job], (run_dir / "slurm" / f"{stage}-{job}.out").read_text()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (stage, info, log[-3000:])
        # One torchrun per node of the allocation, all in one process group.
        assert info["NumNodes"] == str(nodes), info
        assert f"{nodes} node(s) x {procs_per_node}" in log, log[-3000:]
    classifier_log = (run_dir / "slurm" / f"classifier-{jobs['classifier']}.out").read_text()
    assert f"x {nodes * procs_per_node} ranks" in classifier_log, classifier_log[-3000:]
    for artefact in ("classifier/model.pt", "pseudo_masks/train/manifest.json", "segmenter/model.pt"):
        assert (run_dir / artefact).is_file(), artefact
    metrics = json.loads((run_dir / "metrics" / "test.json").read_text())
    assert metrics["samples"] == 8 and 0.0 <= metrics["miou"] <= 1.0


def test_slurm_is_installed_with_apt_get_only_when_asked(monkeypatch, tmp_path):
    """With no SLURM on PATH the fixture skips, naming MLPS_SLURM_APT, unless it is 1; with it,
    the next requirement is apt-get (absent here, so nothing is installed)."""
    if os.geteuid() != 0:
        pytest.skip("the fixture checks for root first")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MLPS_SLURM_APT", raising=False)
    with pytest.raises(pytest.skip.Exception, match="set MLPS_SLURM_APT=1 to install SLURM with apt-get, or install"):
        ensure_installed()
    monkeypatch.setenv("MLPS_SLURM_APT", "1")
    with pytest.raises(pytest.skip.Exception, match="SLURM is not installed and apt-get is missing"):
        ensure_installed()
