"""Pseudo-mask throughput: the batched path (mlps_dist.method.cam) against the per-image reference
that mirrors the public MLPS script (tests/support/reference_cam.py), same model, same images.

    python tools/bench_masks.py --model small38 --size 224 --images 64 --reference-images 8
    torchrun --standalone --nproc_per_node=2 tools/bench_masks.py --model small38 --images 64
    python tools/bench_masks.py --model resnet38d --size 224 --images 256 --batch-size 32   # GPU

Prints one JSON line: images/s of each path, their ratio, the share of equal mask pixels,
world size and the machine. Under torchrun every rank takes its share of the images and
images/s counts all ranks together (slowest rank's wall time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "support"), str(REPO / "tools")]

from reference_cam import reference_masks  # noqa: E402

import bench_common  # noqa: E402
from mlps_dist import dist  # noqa: E402
from mlps_dist.method import cam  # noqa: E402
from mlps_dist.models import create_classifier  # noqa: E402

LAYERS = ["b4_5", "b5_2", "bn7"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small38", help="small38 | resnet38d")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--size", type=int, default=224, help="patch side in pixels")
    p.add_argument("--images", type=int, default=64, help="images for the batched path (all ranks)")
    p.add_argument("--reference-images", type=int, default=8, help="images for the slow path (all ranks)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(n: int, size: int, classes: int, seed: int):
    """Random patches with a white region (so the background step does real work) and
    random non-empty multi-hot labels."""
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    rgb[:, :, : size // 4, : size // 3] = 245
    labels = (torch.rand(n, classes, generator=gen) > 0.5).float()
    labels[labels.sum(1) == 0, 0] = 1.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (rgb.float() / 255 - mean) / std, labels, rgb


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_fast(model, images, labels, rgb, batch_size: int, device: torch.device):
    warm = slice(0, min(batch_size, len(images)))
    cam.make_masks(model, images[warm].to(device), labels[warm].to(device), rgb[warm].to(device), LAYERS)
    synchronize(device)
    start, out = time.perf_counter(), []
    for i in range(0, len(images), batch_size):
        part = slice(i, i + batch_size)
        masks = cam.make_masks(model, images[part].to(device), labels[part].to(device), rgb[part].to(device), LAYERS)
        out.append({k: v.cpu() for k, v in masks.items()})
    synchronize(device)
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.init("auto")
    try:
        rank, world, device = dist.get_rank(), dist.get_world_size(), dist.device()
        torch.manual_seed(args.seed)
        model = create_classifier(args.model, args.classes)
        cam.prepare_model(model)
        model.to(device)
        images, labels, rgb = make_inputs(args.images, args.size, args.classes, args.seed)
        mine = dist.partition(args.images, world, rank)
        fast_s, _ = timed_fast(
            model,
            images[mine.start : mine.stop],
            labels[mine.start : mine.stop],
            rgb[mine.start : mine.stop],
            args.batch_size,
            device,
        )
        ref = dist.partition(args.reference_images, world, rank)
        sl = slice(ref.start, ref.stop)
        start = time.perf_counter()
        ref_masks, _ = reference_masks(model, images[sl].to(device), labels[sl].to(device), rgb[sl], LAYERS)
        synchronize(device)
        ref_s = time.perf_counter() - start
        _, fast_on_ref = timed_fast(model, images[sl], labels[sl], rgb[sl], args.batch_size, device)
        equal = (
            sum(int((torch.cat([b[l] for b in fast_on_ref]).numpy() == ref_masks[l]).sum()) for l in LAYERS)  # noqa: E741
            if len(ref)
            else 0
        )
        totals = torch.tensor([equal, len(ref) * args.size * args.size * len(LAYERS)], dtype=torch.float64)
        dist.all_reduce_sum(totals)
        walls = dist.all_gather_object((fast_s, ref_s))
        fast_wall, ref_wall = max(w[0] for w in walls), max(w[1] for w in walls)
        if rank == 0:
            fast_ips, ref_ips = args.images / fast_wall, args.reference_images / ref_wall
            figures = {
                "model": args.model,
                "size": args.size,
                "classes": args.classes,
                "batch_size": args.batch_size,
                "device": device.type,
                "cpu_threads": torch.get_num_threads(),
                "fast_images_per_s": round(fast_ips, 3),
                "reference_images_per_s": round(ref_ips, 3),
                "equal_pixel_fraction": round(float(totals[0] / totals[1]), 6) if totals[1] else None,
            }
            bench_common.emit(
                bench_common.make_record(
                    "masks",
                    figures,
                    world_size=world,
                    settings=vars(args),
                    baseline="reference: per-image, per-class, per-layer Grad-CAM as the public MLPS script "
                    "(tests/support/reference_cam.py), same model and images, this run",
                    ratio={"speedup": round(fast_ips / ref_ips, 2)},
                )
            )
        return 0
    finally:
        dist.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
