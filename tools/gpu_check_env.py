"""The environment lines of tools/gpu_check.py: GPU, driver, torch, CUDA, cuDNN, NCCL and the
optional packages (version or "absent"), probed in a child process with a time-out so that a
broken torch install is reported rather than hanging or crashing the check."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys

# (module, distribution names to ask for the version); "present" where none is found.
PACKAGES = (
    ("deepspeed", ("deepspeed",)),
    ("nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120")),
    ("webdataset", ("webdataset",)),
    ("tensorboard", ("tensorboard",)),
    ("pytest", ("pytest",)),
    ("numpy", ("numpy",)),
    ("yaml", ("pyyaml",)),
    ("PIL", ("pillow",)),
    ("scipy", ("scipy",)),
    ("openslide", ("openslide-python",)),
    ("shapely", ("shapely",)),
    ("onnxruntime", ("onnxruntime",)),
)

PROBE = r"""
import importlib.util, importlib.metadata as md, json, sys
packages = json.loads(sys.argv[1])
out = {"packages": {}}
for module, dists in packages:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    version = None
    if found:
        version = "present"
        for name in dists:
            try:
                version = md.version(name)
                break
            except md.PackageNotFoundError:
                pass
    out["packages"][module] = version
try:
    import torch
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
else:
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["gpus"] = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory >> 20} MiB)"
                   for i in range(out["cuda_devices"])]
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if out["cuda_devices"] else None
    except Exception:
        out["nccl"] = None
print(json.dumps(out))
"""


def driver() -> str:
    """The NVIDIA driver version (nvidia-smi), or why there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"absent (nvidia-smi: {type(exc).__name__})"
    return out.stdout.split("\n")[0].strip() or f"absent (nvidia-smi exit {out.returncode})"


def probe(timeout: float = 60) -> dict:
    """What this interpreter's environment holds; {"torch_error": ...} when torch cannot load."""
    env = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "host": socket.gethostname(),
        "driver": driver(),
        "packages": {},
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(PACKAGES)], capture_output=True, text=True, timeout=timeout
        )
        env.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        env["torch_error"] = f"the environment probe did not finish in {timeout:.0f} s"
    except (json.JSONDecodeError, IndexError):
        env["torch_error"] = f"the environment probe failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return env


def describe(env: dict) -> list[str]:
    """The first lines of the check's output."""
    absent = "absent"
    gpus = env.get("gpus") or []
    lines = [
        "gpu_check: environment",
        f"  host      {env['host']}",
        f"  GPU       {'; '.join(f'{i}: {g}' for i, g in enumerate(gpus)) or 'none visible to torch'}",
        f"  driver    {env['driver']}",
        f"  python    {env['python']}",
    ]
    if "torch" in env:
        lines.append(
            f"  torch     {env['torch']}, CUDA {env.get('cuda') or absent}, cuDNN {env.get('cudnn') or absent}, "
            f"NCCL {env.get('nccl') or absent}, {env.get('cuda_devices', 0)} CUDA device(s)"
        )
    else:
        lines.append(f"  torch     {absent} ({env.get('torch_error', 'not importable')})")
    packages = env.get("packages", {})
    lines.append(
        "  packages  "
        + ", ".join(f"{'DALI' if m == 'nvidia.dali' else m} {packages.get(m) or absent}" for m, _ in PACKAGES)
    )
    return lines
