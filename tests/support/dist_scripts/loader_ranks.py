"""Run under torchrun: each rank records what its loaders yield, for tests/multiprocess/test_loaders_dist.py.

    torchrun --standalone --nproc_per_node=K tests/support/dist_scripts/loader_ranks.py ROOT OUT BACKENDS

Writes OUT/rank<R>.json with, per back end, the keys of every eval split and of one
training epoch, and checks that a collective after the loops completes on every rank
(a rank with nothing to do must not leave the others waiting).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mlps_dist import dist
from mlps_dist.config import Config
from mlps_dist.data.loaders import create_eval_loader, create_train_loader
from mlps_dist.data.shards import open_split


def record(root: str, backend: str, rank: int, world: int) -> dict:
    cfg = Config()
    cfg.data.root, cfg.data.loader, cfg.data.num_workers = root, backend, 1
    cfg.classifier.augment.rot90 = True
    out = {}
    info_splits = open_split(root, "train").info["splits"]
    for split in info_splits:
        if split == "train":
            continue
        loader = create_eval_loader(cfg, open_split(root, split), batch_size=3, rank=rank, world=world, device="cpu")
        out[split] = {"len": len(loader), "keys": [k for batch in loader for k in batch["key"]]}
    loader = create_train_loader(
        cfg, open_split(root, "train"), batch_size=2, epoch=1, rank=rank, world=world, device="cpu"
    )
    steps = [batch["key"] for batch in loader]
    out["train"] = {"len": len(loader), "steps": steps}
    done = dist.all_reduce_sum(torch.tensor([len(steps)], dtype=torch.int64))
    out["train"]["steps_all_ranks"] = int(done.item())
    return out


def main() -> None:
    root, out_dir, backends = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    env = dist.init(backend="gloo")
    try:
        result = {b: record(root, b, dist.get_rank(), dist.get_world_size()) for b in backends}
        dist.barrier()
        (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))
    finally:
        dist.teardown()


if __name__ == "__main__":
    main()
