"""Step times of the trained networks with each GPU speed option (gpu.cudnn_benchmark,
gpu.channels_last, both) against none, in one process, on synthetic batches: what the
defaults of those keys should be (tools/gpu_check.py runs it; docs/benchmarks.md).

    python tools/gpu_speed_probe.py                       # ResNet-38d and DeepLab-v3+ R101, 224 px, bf16
    python tools/gpu_speed_probe.py --models small --size 32 --steps 1 --warmup 0   # smoke test (CPU)

Each step is forward, the stage's loss, backward and an SGD step, timed with the device
synchronised; the median of ``--steps`` after ``--warmup`` (autotuning happens in the
warm-up). Prints one JSON line: {"bench": "gpu_speed", "figures": {"runs": {model: {variant: ms}}}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlps_dist.config import GpuConfig  # noqa: E402
from mlps_dist.models import create_classifier, create_segmenter  # noqa: E402
from mlps_dist.train import gpu_options  # noqa: E402

MODELS = {"paper": ("resnet38d", "deeplabv3plus_resnet101"), "small": ("small38", "deeplabv3plus_small")}
VARIANTS = {
    "none": GpuConfig(),
    "cudnn_benchmark": GpuConfig(cudnn_benchmark=True),
    "channels_last": GpuConfig(channels_last=True),
    "both": GpuConfig(cudnn_benchmark=True, channels_last=True),
}


def build(name: str):
    if name.startswith("deeplab"):
        return create_segmenter(name, 4, "")
    return create_classifier(name, 4, dropout=0.0)


def loss_of(name: str, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if name.startswith("deeplab"):  # per-pixel CE against a fixed mask, as stage 3
        return F.cross_entropy(out.float(), labels)
    return F.multilabel_soft_margin_loss(out.float(), labels)


def time_steps(name: str, gpu: GpuConfig, device: torch.device, args) -> float:
    gpu_options.apply(gpu, device)
    torch.manual_seed(0)
    model = build(name).to(device)
    if gpu.channels_last:
        model = gpu_options.channels_last(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = (
        torch.randint(0, 4, (args.batch, args.size, args.size), device=device)
        if name.startswith("deeplab")
        else (torch.rand(args.batch, 4, device=device) < 0.5).float()
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_of(name, model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return round(1000 * statistics.median(times), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="paper", choices=sorted(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    runs = {}
    for name in MODELS[args.models]:
        runs[f"{name} {args.precision} b{args.batch}"] = {
            variant: time_steps(name, gpu, device, args) for variant, gpu in VARIANTS.items()
        }
        print(
            f"[gpu_speed_probe] {name}: {runs[f'{name} {args.precision} b{args.batch}']}", file=sys.stderr, flush=True
        )
    gpu_options.apply(GpuConfig(), device)
    print(json.dumps({"bench": "gpu_speed", "device": str(device), "settings": vars(args), "figures": {"runs": runs}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
