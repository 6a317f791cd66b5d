"""Speed options for CUDA ranks (the ``gpu`` config section), all off by default: none has
been measured on a GPU yet (tools/gpu_check.sh measures them; docs/benchmarks.md).
``gpu.dali_pipeline_per_run`` acts on CPU ranks too: it is read by the DALI loader
(data/dali_pool.py), not here.

    apply(cfg.gpu, device)                 # process-wide switches (cuDNN autotuning)
    module = channels_last(module)         # NHWC weights, 4-D inputs converted on the way in

None of them changes what is trained or which samples are seen; they change the kernels
that run, so results stay equal within floating-point rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mlps_dist.config import GpuConfig


def apply(gpu: GpuConfig, device: torch.device) -> dict:
    """Set the process-wide switches for ``device``; returns what is on (for the run log)."""
    on = {}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(gpu.cudnn_benchmark)
        on["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    on["channels_last"] = bool(gpu.channels_last)
    on["dali_pinned_copies"] = bool(gpu.dali_pinned_copies) and device.type == "cuda"
    on["dali_pipeline_per_run"] = bool(gpu.dali_pipeline_per_run)  # acts on CPU ranks too (data/dali_pool.py)
    return on


def _nhwc_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.ndim == 4 else a for a in args
    )


def channels_last(module: nn.Module) -> nn.Module:
    """``module`` with NHWC (channels_last) parameters, and its 4-D tensor inputs converted
    before each forward, so convolutions run in NHWC throughout (tensor cores under AMP)."""
    module = module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_nhwc_inputs)
    return module
