"""Training-loader throughput (images/s) per back end against a baseline that loads data
the way the public MLPS code does: one PNG file per sample read from the LUAD folder with
PIL, labels parsed from the file name, a shuffled torch DataLoader, same augmentations and
worker count. Prints one JSON line. A benchmark, not a test.

    python tools/bench_loader.py                          # synthetic data, 512 patches of 224 px
    python tools/bench_loader.py --src data/LUAD-HistoSeg --workers 8 --batch 32
    torchrun --nproc_per_node=8 tools/bench_loader.py --src ...   # all ranks together

Keys: ``torch``/``dali`` read PNG shards; ``torch_webp``, ``dali_jpeg``, ... read shards whose
training images are stored as WebP (lossless) or JPEG (``--image-formats``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import bench_common  # noqa: E402
from mlps_dist import dist  # noqa: E402
from mlps_dist.config import Config  # noqa: E402
from mlps_dist.data.augment import colour, geometric, normalise, sample_params  # noqa: E402
from mlps_dist.data.ingest import build_plan, write_plan  # noqa: E402
from mlps_dist.data.layouts import LUAD, find_train_dir  # noqa: E402
from mlps_dist.data.loaders import create_train_loader  # noqa: E402
from mlps_dist.data.shards import open_split  # noqa: E402


class PngFolderDataset(Dataset):
    """The baseline: a file listing, PIL per sample, label from the name."""

    def __init__(self, folder: Path, cfg: Config):
        self.files, self.cfg = sorted(folder.glob("*.png")), cfg

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        labels = torch.tensor(LUAD.parse_train_name(path.name, 4)[0], dtype=torch.float32)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        p = sample_params(self.cfg.classifier.augment, self.cfg.seed, 0, i)
        image = normalise(colour(geometric(rgb, p).astype(np.float32), p), self.cfg.data.mean, self.cfg.data.std)
        return torch.from_numpy(image), labels


def measure(batches, steps: int, device) -> tuple[int, float]:
    """Images and seconds over ``steps`` batches after one warm-up batch."""
    it = iter(batches)
    next(it)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        image.to(device).sum().item()  # wait for the data to be there
        images += image.shape[0]
    return images, time.perf_counter() - start


def prepare(args) -> tuple[Path, dict[str, Path]]:
    """The source folder and one shard folder per ``--image-formats`` entry."""
    if args.src:
        src = Path(args.src)
    else:
        from mlps_dist.synthetic.patches import write_luad_layout

        src = Path(args.workdir) / "luad"
        if dist.is_main():
            write_luad_layout(
                src, train=args.n, val=0, test=0, size=args.size, seed=0, workers=min(os.cpu_count() or 1, 8)
            )  # the same bytes for any number of workers
    shards = {fmt: Path(args.workdir) / f"shards-{fmt}" for fmt in args.image_formats.split(",")}
    if dist.is_main():
        plan = build_plan(LUAD, src, shard_size=256, workers=max(args.workers, 1))
        for fmt, folder in shards.items():
            write_plan(plan, folder, log=lambda *_: None, image_format=fmt)
    dist.barrier()
    return src, shards


def total_rate(images: int, seconds: float) -> float:
    images_all = dist.all_reduce_sum(torch.tensor([images], dtype=torch.float64)).item()
    return images_all / max(dist.all_gather_object(seconds))


def run(args) -> dict:
    src, shards = prepare(args)
    cfg = Config()
    cfg.data.num_workers = args.workers
    cfg.classifier.augment.rot90, cfg.classifier.augment.color_jitter = True, 0.1
    rank, world, device = dist.get_rank(), dist.get_world_size(), dist.device()
    n = len(open_split(next(iter(shards.values())), "train"))
    steps = min(args.steps, n // (args.batch * world) - 1)
    baseline = DataLoader(
        PngFolderDataset(find_train_dir(LUAD, src), cfg),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    rates = {"baseline_png_folder": total_rate(*measure(baseline, steps, device))}
    for fmt, folder in shards.items():  # "torch" = PNG shards, "torch_jpeg" = JPEG shards, ...
        reader = open_split(folder, "train")
        cfg.data.root = str(folder)
        for backend in args.backends.split(","):
            cfg.data.loader = backend
            loader = create_train_loader(
                cfg, reader, batch_size=args.batch, epoch=0, rank=rank, world=world, device=device
            )
            rates[backend if fmt == "png" else f"{backend}_{fmt}"] = total_rate(*measure(loader, steps, device))
    figures = {
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "workers_per_rank": args.workers,
        "batch_per_rank": args.batch,
        "steps": steps,
        "image_size": Image.open(next(find_train_dir(LUAD, src).glob("*.png"))).size[0],
    }
    return bench_common.make_record(
        "loader",
        figures,
        world_size=world,
        settings={k: v for k, v in vars(args).items() if k != "workdir"},
        baseline="baseline_png_folder: one PNG file per sample via PIL, shuffled torch DataLoader, same "
        "augmentation and worker count, same images, this run",
        ratio={k: round(v / rates["baseline_png_folder"], 3) for k, v in rates.items()},
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="loader throughput vs. a PNG-folder baseline")
    p.add_argument("--src", default="", help="LUAD-HistoSeg folder; default: synthetic patches")
    p.add_argument("--n", type=int, default=512, help="synthetic patches to generate")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backends", default="torch,dali")
    p.add_argument(
        "--image-formats",
        default="png,webp,jpeg",
        help="shard encodings of the training images to measure (mlps shards --image-format)",
    )
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)
    dist.init()
    tmp = tempfile.TemporaryDirectory() if not args.workdir else None
    args.workdir = args.workdir or dist.broadcast_object(tmp.name)
    try:
        record = run(args)
        if dist.is_main():
            bench_common.emit(record)
    finally:
        dist.teardown()
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
