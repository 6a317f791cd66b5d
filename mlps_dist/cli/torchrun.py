"""One stage of the pipeline on this node under torchrun: what ``mlps stage`` and each step of
``mlps pipeline`` run.

The node's setup comes from the environment (mlps_dist.dist.read_launch_env), all optional:

    NPROC_PER_NODE   processes on this node (default: one per GPU, or 2 on a CPU machine)
    NNODES           nodes taking part (default: SLURM_NNODES under SLURM, else 1)
    NODE_RANK        this node's rank 0..NNODES-1 (default: SLURM_NODEID)
    MASTER_ADDR      host of node rank 0: the c10d rendezvous (default: first node of the SLURM job)
    MASTER_PORT      rendezvous port (default under SLURM: derived from the job id)
    RDZV_ID          rendezvous id shared by all nodes (default: SLURM_JOB_ID, else "mlps")
    MAX_RESTARTS     elastic restarts of the worker group after a worker dies (default 0);
                     the stage resumes from its last checkpoint after each restart
    MLPS_SHUTDOWN_TIMEOUT  seconds torchrun lets the workers checkpoint after a signal
                     (default: the config's dist.shutdown_timeout_s)
    MLPS_STATUS_DIR  where the workers leave their own exit status (default: a temporary folder)
    MLPS_FORWARD_SIGNALS=0  the launcher passes no signal on (SLURM signals every process itself)

The status is the workers' own: torchrun reports every worker failure as 1, and each failing
worker leaves its status in MLPS_STATUS_DIR (mlps_dist.core.runner.record_status); 1 if a
worker hit a defect, else 75 if one was preempted, else the bad-input 2.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mlps_dist.cli.forwarding import Forwarder, log
from mlps_dist.core.errors import EXIT_PREEMPTED, InputError

# Stage name -> the module torchrun starts (each has main(argv); see mlps_dist.cli.COMMANDS).
STAGE_MODULES = {
    "classifier": "mlps_dist.stages.train_classifier",
    "masks": "mlps_dist.stages.generate_masks",
    "segmenter": "mlps_dist.stages.train_segmenter",
    "evaluate": "mlps_dist.stages.evaluate",
}
STATUS_DIR_ENV = "MLPS_STATUS_DIR"  # read by mlps_dist.core.runner.record_status in each worker


def stage_module(stage: str) -> str:
    if stage not in STAGE_MODULES:
        raise InputError(
            f"unknown stage '{stage}': use one of {', '.join(STAGE_MODULES)} (any other mlps command runs "
            "under torchrun as: torchrun --nproc-per-node N -m mlps_dist -- COMMAND ...)"
        )
    return STAGE_MODULES[stage]


def gpu_count(visible: str | None) -> int:
    """GPUs on this node: those CUDA_VISIBLE_DEVICES names, else nvidia-smi's, 0 on a CPU machine
    (torch is not asked: CUDA must not be initialised in the launcher)."""
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU") for line in listing.splitlines())


def _positive(name: str, value: str, zero_ok: bool = False) -> int:
    if not re.fullmatch(r"[0-9]+" if zero_ok else r"[1-9][0-9]*", value):
        raise InputError(f"{name} must be a {'whole number' if zero_ok else 'positive integer'}, got '{value}'")
    return int(value)


def head_node(nodelist: str) -> str:
    """The first node of the SLURM allocation: the host of the c10d rendezvous."""
    if not nodelist:
        raise InputError("several nodes need MASTER_ADDR (the host of node rank 0) when not under SLURM")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise InputError(
            f"cannot expand SLURM_JOB_NODELIST '{nodelist}' with scontrol ({exc}); set MASTER_ADDR"
        ) from exc
    return hosts[0]


def torchrun_options(shutdown_timeout_s: int) -> tuple[list[str], dict[str, str], str]:
    """torchrun's options for this node, the environment they add, and the log's description."""
    from mlps_dist.dist import read_launch_env

    env = read_launch_env()
    nproc = (
        _positive("NPROC_PER_NODE", env.nproc_per_node) if env.nproc_per_node else (gpu_count(env.visible_devices) or 2)
    )
    nnodes = _positive("NNODES", env.nnodes)
    restarts = _positive("MAX_RESTARTS", env.max_restarts, zero_ok=True)
    # SIGUSR1 is the usual SLURM preemption notice: torchrun passes it on like SIGTERM.
    options = [
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"--shutdown-timeout={shutdown_timeout_s}",
    ]
    # torchrun keeps one TCP store for all restarts of the worker group, and the keys the
    # previous group left there (its gloo/NCCL addresses) can be read by the new group: its
    # process group then connects to dead peers. With restarts allowed, each new group
    # brings up its own store instead.
    extra_env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if restarts > 0 else {}
    if nnodes == 1:
        options.append("--standalone")
    else:
        if not env.node_rank:
            raise InputError(f"NNODES={nnodes} needs NODE_RANK (0 on the node named by MASTER_ADDR)")
        addr = env.master_addr or head_node(env.slurm_nodelist)
        if env.master_port:
            port = env.master_port
        elif env.slurm_job_id.isdigit():  # two jobs sharing a head node do not collide
            port = str(20000 + int(env.slurm_job_id) % 20000)
        else:
            raise InputError("several nodes need MASTER_PORT (a free TCP port on MASTER_ADDR) when not under SLURM")
        # Node rank 0 hosts the rendezvous store; the others only connect to it.
        options += [
            f"--nnodes={nnodes}",
            f"--node-rank={env.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={addr}:{port}",
            f"--rdzv-id={env.rdzv_id}",
            f"--rdzv-conf=is_host={'true' if env.node_rank == '0' else 'false'}",
        ]
    return options, extra_env, f"{nnodes} node(s) x {nproc} process(es)"


def shutdown_timeout(cfg_value: int) -> int:
    """How long torchrun lets the workers write their preemption checkpoint after passing a
    signal on, before it kills them: dist.shutdown_timeout_s, or MLPS_SHUTDOWN_TIMEOUT."""
    given = os.environ.get("MLPS_SHUTDOWN_TIMEOUT", "")
    return _positive("MLPS_SHUTDOWN_TIMEOUT", given) if given else cfg_value


def worker_status(folder: Path) -> int | None:
    """The workers' own status from the files they left: 1 (a defect) before 75 (preempted)
    before any other (a bad input); None when no worker left one."""
    codes = []
    for path in sorted(folder.glob("rank-*")):
        try:
            codes.append(int(path.read_text().strip()))
        except (OSError, ValueError):
            continue
    for wanted in (1, EXIT_PREEMPTED):
        if wanted in codes:
            return wanted
    return codes[0] if codes else None


def run_stage(
    forwarder: Forwarder, stage: str, config: str, run: str, overrides: list[str], shutdown_timeout_s: int
) -> int:
    """The stage under torchrun on this node; its workers' status (see the module's text)."""
    module = stage_module(stage)
    options, extra_env, shape = torchrun_options(shutdown_timeout(shutdown_timeout_s))
    log(f"{stage} on {socket.gethostname()}: {shape}, run {run}")
    given = os.environ.get(STATUS_DIR_ENV, "")  # slurm/stage.sbatch: a shared folder, read there too
    status_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="mlps-status."))
    status_dir.mkdir(parents=True, exist_ok=True)
    # The stage's arguments follow "--": torchrun's parser would take --run for its --run-path.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *options,
        "-m",
        module,
        "--",
        config,
        "--run",
        run,
        *overrides,
    ]
    try:
        status = forwarder.run(command, env={**os.environ, **extra_env, STATUS_DIR_ENV: str(status_dir)})
        if status == 1:
            worker = worker_status(status_dir)
            if worker is not None and worker != 1:
                log(f"{stage}: a worker exited with status {worker} (its error is above torchrun's report)")
                status = worker
    finally:
        if not given:
            shutil.rmtree(status_dir, ignore_errors=True)
    return status
