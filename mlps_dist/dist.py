"""Process-group life cycle and the rank/world helpers.

This is the only module that reads the distributed environment (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK, ...; SLURM's SLURM_JOB_ID, ...). Everything else asks here.

    env = dist.init(backend="auto")      # NCCL on GPU, gloo on CPU; no-op for one process
    try:
        ...
    finally:
        dist.teardown()

A plain ``python -m mlps_dist.<stage>`` (no torchrun) runs as rank 0 of 1 without a
process group; collectives below then act on the local value.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from mlps_dist.core.errors import MlpsError


class TooManyRanks(MlpsError):
    """More ranks on a node than visible GPUs: NCCL cannot share one GPU between ranks."""

    shared = True  # every rank of the node finds it; rank 0 reports it


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0  # torchrun elastic restarts of this worker group
    slurm_job_id: str = ""
    slurm_restart_count: int = 0  # SLURM requeues of this job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """True under torchrun (or any launcher that sets RANK/WORLD_SIZE)."""
        return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def read_env() -> DistEnv:
    return DistEnv(
        rank=_int_env("RANK", 0),
        world_size=_int_env("WORLD_SIZE", 1),
        local_rank=_int_env("LOCAL_RANK", 0),
        local_world_size=_int_env("LOCAL_WORLD_SIZE", 1),
        restart_count=_int_env("TORCHELASTIC_RESTART_COUNT", 0),
        slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
        slurm_restart_count=_int_env("SLURM_RESTART_COUNT", 0),
    )


@dataclass(frozen=True)
class LaunchEnv:
    """What a launcher (``mlps stage``, ``mlps pipeline``) reads of this node's setup, as given
    (strings, "" where unset; mlps_dist.cli.torchrun checks them): the user's NPROC_PER_NODE,
    NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID, MAX_RESTARTS, falling back to what
    SLURM says (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID), and the GPUs CUDA_VISIBLE_DEVICES
    leaves visible (None when it is unset: all of them)."""

    nproc_per_node: str = ""
    nnodes: str = "1"
    node_rank: str = ""
    master_addr: str = ""
    master_port: str = ""
    rdzv_id: str = "mlps"
    max_restarts: str = "0"
    slurm_job_id: str = ""
    slurm_nodelist: str = ""
    visible_devices: str | None = None


def read_launch_env() -> LaunchEnv:
    get = os.environ.get
    return LaunchEnv(
        nproc_per_node=get("NPROC_PER_NODE", ""),
        nnodes=get("NNODES") or get("SLURM_NNODES") or "1",
        node_rank=get("NODE_RANK") or get("SLURM_NODEID") or "",
        master_addr=get("MASTER_ADDR", ""),
        master_port=get("MASTER_PORT", ""),
        rdzv_id=get("RDZV_ID") or get("SLURM_JOB_ID") or "mlps",
        max_restarts=get("MAX_RESTARTS") or "0",
        slurm_job_id=get("SLURM_JOB_ID", ""),
        slurm_nodelist=get("SLURM_JOB_NODELIST", ""),
        visible_devices=get("CUDA_VISIBLE_DEVICES"),
    )


_ENV = read_env()
_SAVED_ENV: dict[str, str | None] = {}  # environment before init made a group of one
_HOST_GROUP = None  # gloo group beside NCCL for host-side flags (see start_vote)


def env() -> DistEnv:
    return _ENV


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else _ENV.rank


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else _ENV.world_size


def is_main() -> bool:
    return get_rank() == 0


def device() -> torch.device:
    """This rank's compute device: its local GPU when CUDA is present, else the CPU. More
    ranks on the node than visible GPUs are refused (TooManyRanks) instead of sharing one."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        ranks = max(_ENV.local_world_size, _ENV.local_rank + 1)
        if ranks > gpus:
            raise TooManyRanks(
                f"{ranks} ranks on this node (LOCAL_WORLD_SIZE) but {gpus} GPU(s) visible: start at "
                f"most {gpus} (torchrun --nproc_per_node / NPROC_PER_NODE) or make more GPUs visible "
                "(CUDA_VISIBLE_DEVICES); CUDA_VISIBLE_DEVICES= runs the ranks on the CPU"
            )
        return torch.device("cuda", _ENV.local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str = "auto", timeout_s: int = 1800, force_group: bool = False) -> DistEnv:
    """Start the process group (if launched by torchrun, or when ``force_group``).

    ``force_group`` makes a single plain process a group of one, which DeepSpeed needs.
    """
    global _ENV, _HOST_GROUP
    _ENV = read_env()
    if tdist.is_initialized():
        return _ENV
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("dist.backend=nccl needs CUDA GPUs; use dist.backend=gloo (or auto) on CPU")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    if not _ENV.launched:
        if not force_group:
            return _ENV
        # A group of one, for this process only: the variables it needs are set now and put
        # back by teardown, so that a later stage in the same process does not take itself for
        # a torchrun worker and rendezvous on a port picked long ago (taken by then).
        own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        own.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR") or "127.0.0.1")
        own.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT") or str(_free_port()))
        _SAVED_ENV.update({key: os.environ.get(key) for key in own})
        os.environ.update(own)
        _ENV = read_env()
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device()
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    if backend == "nccl" and get_world_size() > 1:  # collective: every rank creates it here
        _HOST_GROUP = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return _ENV


def teardown() -> None:
    global _HOST_GROUP, _ENV
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _HOST_GROUP = None
    for key, value in _SAVED_ENV.items():  # what init set for a group of one
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if _SAVED_ENV:
        _SAVED_ENV.clear()
        _ENV = read_env()


def barrier() -> None:
    if tdist.is_initialized() and get_world_size() > 1:
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[device().index])
        else:
            tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (works on CPU tensors under NCCL too)."""
    if not (tdist.is_initialized() and get_world_size() > 1):
        return tensor
    if tdist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(device())
        tdist.all_reduce(moved)
        tensor.copy_(moved.cpu())
    else:
        tdist.all_reduce(tensor)
    return tensor


@dataclass
class Vote:
    """A host-side sum over ranks in flight; ``any()`` waits for it (usually long done)."""

    work: object
    tensor: torch.Tensor

    def any(self) -> bool:
        if self.work is not None:
            self.work.wait()
        return bool(self.tensor.item() > 0)


def start_vote(flag: bool) -> Vote:
    """Start summing a 0/1 flag over ranks without waiting (collective). It runs on the CPU:
    under NCCL on a gloo group of its own, so checking a flag every step neither waits for
    the GPU nor, when read a step later, for the other ranks."""
    tensor = torch.tensor([1.0 if flag else 0.0])
    if not (tdist.is_initialized() and get_world_size() > 1):
        return Vote(None, tensor)
    group = _HOST_GROUP if tdist.get_backend() == "nccl" else None
    return Vote(tdist.all_reduce(tensor, group=group, async_op=True), tensor)


def all_gather_object(obj):
    if not (tdist.is_initialized() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (tdist.is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn):
    """Run ``fn`` on rank 0 only; every rank gets its result or raises its error (collective:
    call it on every rank). A failure on rank 0 (a full disk while writing a file every rank
    waits for) thus stops every rank with the same error, which rank 0 alone reports."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        error.shared = True  # every rank raises it: rank 0 alone reports it
        raise error
    return result


def partition(n: int, world: int, rank: int) -> range:
    """Contiguous, balanced slice of ``range(n)`` for ``rank``: the slices of all ranks
    cover every index exactly once; sizes differ by at most one; ranks beyond ``n`` get
    an empty range."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"partition: rank {rank} not in a world of {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
