"""One optimizer step of engine.train_step on every rank of a gloo job, for several batch
plans of a global batch of 20; rank 0 saves the all-reduced gradient and the logged loss.

    torchrun --standalone --nproc_per_node=W tests/support/dist_scripts/plan_gradients.py OUT [nccl]

OUT/grads-w<W>-m<micro_batch_size>.pt: {"grads": {name: tensor}, "loss": float, "plan": str},
to compare with single_process_gradient().
With ``nccl`` the model runs on the rank's GPU and is wrapped in DDP even on one rank, so
the NCCL all-reduce and ``no_sync`` accumulation path run on a single GPU too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlps_dist import dist
from mlps_dist.config import TrainConfig
from mlps_dist.data import batching
from mlps_dist.data.batching import rank_micro_batches
from mlps_dist.data.sampling import permutation
from mlps_dist.train import engine, parallel

SAMPLES, FEATURES, GLOBAL_BATCH, SEED = 50, 5, 20, 7
MICRO_BATCH_SIZES = (0, 2)  # as large as possible; 2 per forward (accumulation)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def param_groups(self):
        return {"backbone": list(self.body.parameters()), "head": list(self.head.parameters())}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(SAMPLES, FEATURES, generator=gen), torch.randint(0, 3, (SAMPLES,), generator=gen)


class Task:
    def __init__(self):
        self.x, self.y = data()

    def loss(self, model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"])  # a mean over the micro batch


def single_process_gradient() -> tuple[dict, float]:
    """What every batch plan must reproduce: the mean loss over the first global batch of the
    epoch, one forward, one process, and its gradient."""
    x, y = data()
    batch = torch.as_tensor(permutation(SAMPLES, SEED, 0)[:GLOBAL_BATCH])
    torch.manual_seed(0)
    net = TinyNet()
    loss = F.cross_entropy(net(x[batch]), y[batch])
    loss.backward()
    return {n: p.grad for n, p in net.named_parameters()}, float(loss.detach())


def main() -> int:
    out = Path(sys.argv[1])
    backend = sys.argv[2] if len(sys.argv) > 2 else "gloo"
    dist.init(backend)
    device = dist.device() if backend == "nccl" else torch.device("cpu")
    try:
        task = Task()
        for micro in MICRO_BATCH_SIZES:
            cfg = TrainConfig(batch_size=GLOBAL_BATCH, micro_batch_size=micro, lr=0.1, momentum=0.0, weight_decay=0.0)
            plan = batching.plan_batches(cfg, dist.get_world_size())
            torch.manual_seed(0)
            model = parallel.wrap(TinyNet(), cfg, plan=plan, total_steps=10, device=device)
            if backend == "nccl" and not isinstance(model.forward_module, nn.parallel.DistributedDataParallel):
                model.forward_module = nn.parallel.DistributedDataParallel(model.module, device_ids=[device.index])
            captured = {}
            step = model.step

            def capture_then_step():
                captured.update({n: p.grad.detach().cpu().clone() for n, p in model.module.named_parameters()})  # noqa: B023
                step()  # noqa: B023

            model.step = capture_then_step
            order = permutation(SAMPLES, SEED, 0)
            idx = rank_micro_batches(order, plan, dist.get_rank())
            batches = iter({"x": task.x[i].to(device), "y": task.y[i].to(device)} for i in idx)
            loss = engine._mean_over_ranks(engine.train_step(model, task, batches, plan))
            if dist.is_main():
                torch.save(
                    {"grads": captured, "loss": loss, "plan": plan.describe()}, out / f"grads-w{plan.world}-m{micro}.pt"
                )
            dist.barrier()
        return 0
    finally:
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
