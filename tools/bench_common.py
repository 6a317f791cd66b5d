"""What every benchmark script shares: the machine description, peak memory, and the one
JSON line each script prints.

    record = make_record("train", figures, world_size=2, baseline="DDP on 1 rank", ratio={...},
                         settings=vars(args))
    emit(record)                       # one line on stdout; logs go to stderr

A record holds: ``bench`` (which script), ``time`` (UTC), ``host``, ``machine`` (CPU model,
core count, GPU model or none, torch/CUDA/Python versions), ``world_size``, ``settings`` (the
flags that produced it), ``figures`` (the measurements), ``baseline`` (what the ratios are
relative to, measured in the same run on the same data) and ``ratio``. tools/bench_all.sh
appends these lines to bench/results-<hostname>.jsonl, so runs on different machines and
days can be compared line by line.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import socket
import subprocess
import sys
from pathlib import Path

RECORD_FIELDS = ("bench", "time", "host", "machine", "world_size", "settings", "figures", "baseline", "ratio")
MACHINE_FIELDS = ("cpu", "cores", "gpu", "gpu_count", "torch", "cuda", "python")


def torchrun_command() -> list[str]:
    """This interpreter's torchrun script, or its module where the script lies elsewhere (a
    system python3 with torch, MLPS_PYTHON=python3)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (a container or SLURM allocation may grant fewer than the host has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> dict:
    import torch  # here, so that scripts can reject bad flags before the slow import

    has_gpu = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "gpu": torch.cuda.get_device_name(0) if has_gpu else "none",
        "gpu_count": torch.cuda.device_count() if has_gpu else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
    }


def reset_peak_memory(device) -> None:
    """Start a new GPU peak; on the CPU the peak (max RSS) covers the whole process life."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device) -> float:
    """Peak memory of this process: GPU memory allocated by torch on a GPU, else max RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_record(
    bench: str, figures: dict, *, world_size: int, baseline: str, ratio: dict, settings: dict | None = None
) -> dict:
    return {
        "bench": bench,
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "machine": machine(),
        "world_size": world_size,
        "settings": settings or {},
        "figures": figures,
        "baseline": baseline,
        "ratio": ratio,
    }


def check_record(record: dict) -> dict:
    """Raise ValueError naming the missing fields; returns the record unchanged."""
    missing = [k for k in RECORD_FIELDS if k not in record]
    missing += [f"machine.{k}" for k in MACHINE_FIELDS if k not in record.get("machine", {})]
    if missing:
        raise ValueError(f"benchmark record lacks {', '.join(missing)}")
    return record


def emit(record: dict) -> None:
    """Print the record as the single JSON line on stdout (the only thing a script prints there)."""
    print(json.dumps(check_record(record), sort_keys=False), flush=True)


def log(message: str) -> None:
    """Progress for a human, on stderr, so stdout stays one JSON line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def synthetic_shards(
    workdir: str | Path,
    *,
    train: int,
    size: int,
    val: int = 2,
    test: int = 2,
    shard_size: int = 256,
    seed: int = 0,
    image_format: str = "png",
) -> Path:
    """Synthetic LUAD-layout patches converted by mlps shards: the shard folder (data.root),
    training images stored as ``image_format``. Reuses shards a previous call completed in
    ``workdir`` when they are big enough."""
    workdir = Path(workdir)
    src, root = workdir / "luad", workdir / ("shards" if image_format == "png" else f"shards-{image_format}")
    if (root / "info.json").is_file():
        split = json.loads((root / "info.json").read_text())["splits"]["train"]
        if (
            split["count"] >= train
            and split["image_size"][0] == size
            and split.get("image_format", "png") == image_format
        ):
            return root
        raise ValueError(
            f"{root} holds {split['count']} train patches of {split['image_size'][0]} px, not "
            f">= {train} of {size} px; pick another --workdir or delete {workdir}"
        )
    from mlps_dist.synthetic.patches import write_luad_layout

    write_luad_layout(
        src, train=train, val=val, test=test, size=size, seed=seed, workers=min(os.cpu_count() or 1, 8)
    )  # the same bytes for any number of workers
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlps_dist",
            "shards",
            "--layout",
            "luad",
            "--src",
            str(src),
            "--out",
            str(root),
            "--shard-size",
            str(shard_size),
            "--image-format",
            image_format,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mlps shards failed on {src}: {proc.stderr.strip()[-2000:]}")
    return root


def ratio(value: float, base: float, digits: int = 3) -> float | None:
    """value / base, or None when the baseline is missing or zero (never a fake number)."""
    if value is None or not base:
        return None
    return round(value / base, digits)


def check_lines(text: str) -> dict:
    """The record in ``text``, which must be exactly one JSON line (what a benchmark printed)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"expected one JSON line on stdout, got {len(lines)} lines")
    try:
        record = json.loads(lines[0])
    except json.JSONDecodeError as exc:
        raise ValueError(f"stdout is not a JSON line ({exc}): {lines[0][:200]}") from None
    return check_record(record)


if __name__ == "__main__":  # python tools/bench_common.py < output: exit 1 unless it is one valid record
    try:
        check_lines(sys.stdin.read())
    except ValueError as exc:
        sys.exit(f"bad benchmark output: {exc}")
