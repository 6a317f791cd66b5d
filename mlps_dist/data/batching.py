"""The batch plan: how the configured global batch is spread over ranks and micro steps,
and the loss weight that keeps the gradient that of the whole global batch.

    plan = plan_batches(train_cfg, world=8)     # global batch 20 = 3 x 4 ranks + 2 x 4 ranks
    plan.sizes(rank)                            # samples of this rank per micro step
    plan.loss_weight(micro, rank)               # multiplies that micro step's mean loss

One optimizer step consumes ``global_batch`` consecutive samples of the epoch's
permutation, split into ``accumulation`` micro steps of ``world`` slots each. The
``world x accumulation`` slots receive ``global_batch // slots`` samples, the first
``global_batch % slots`` of them (in micro-major order) one more: every rank runs the same
number of micro steps (DDP and DeepSpeed need that), while the global batch, the epoch
length (``n // global_batch`` steps) and hence the LR schedule do not depend on the world
size.

Exactness: DDP averages gradients over ranks (divides by ``world``) and the optimizer step
sums the micro steps, so a slot of ``k`` samples whose loss is a mean over its samples is
weighted by ``k x world / global_batch``. Then the all-reduced gradient is
``sum_slots k/G x grad(mean over slot) = grad(mean over the global batch)``, exactly the
single-process gradient of the same samples. With even slots the weight is
``1 / accumulation``, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlps_dist.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # samples per optimizer step, whatever the world size
    micro_batch: int  # largest number of samples of one rank in one forward
    accumulation: int  # forwards per rank per optimizer step
    world: int

    @property
    def slots(self) -> int:
        return self.world * self.accumulation

    @property
    def even(self) -> bool:
        return self.global_batch % self.slots == 0

    def slot_size(self, micro: int, rank: int) -> int:
        base, extra = divmod(self.global_batch, self.slots)
        return base + int(micro * self.world + rank < extra)

    def slot_offset(self, micro: int, rank: int) -> int:
        """Position of the slot's first sample inside the global batch of its step."""
        j = micro * self.world + rank
        base, extra = divmod(self.global_batch, self.slots)
        return j * base + min(j, extra)

    def sizes(self, rank: int) -> list[int]:
        return [self.slot_size(m, rank) for m in range(self.accumulation)]

    def loss_weight(self, micro: int, rank: int) -> float:
        """Factor on the micro step's mean loss (see the module docstring)."""
        return self.slot_size(micro, rank) * self.world / self.global_batch

    def steps_per_epoch(self, n: int) -> int:
        return n // self.global_batch

    def micro_steps_per_epoch(self, n: int) -> int:
        return self.steps_per_epoch(n) * self.accumulation

    def describe(self) -> str:
        """``global batch 20 = 5 x 4 ranks x 1 accumulation``, ``global batch 20 = 3 x 4 ranks + 2 x 4
        ranks`` (8 ranks), ``global batch 20 = 2 x 6 + 1 x 8 micro batches (7 ranks x 2 accumulation)``."""
        counts: dict[int, int] = {}
        for j in range(self.slots):
            size = self.slot_size(j // self.world, j % self.world)
            counts[size] = counts.get(size, 0) + 1
        if len(counts) == 1:
            parts = f"{self.micro_batch} x {self.world} ranks x {self.accumulation} accumulation"
        elif self.accumulation == 1:
            parts = " + ".join(f"{size} x {n} ranks" for size, n in sorted(counts.items(), reverse=True))
        else:  # counted over all micro steps, so the sum is the global batch
            parts = " + ".join(f"{size} x {n}" for size, n in sorted(counts.items(), reverse=True))
            parts += f" micro batches ({self.world} ranks x {self.accumulation} accumulation)"
        return f"global batch {self.global_batch} = {parts}"


def plan_batches(train_cfg: TrainConfig, world: int, section: str = "train") -> BatchPlan:
    """The plan for ``world`` ranks; ConfigError when the global batch cannot give every
    rank at least one sample per micro step. ``micro_batch_size`` (0 = as large as the
    global batch allows) caps the samples of one rank per forward; accumulation follows."""
    batch, micro = train_cfg.batch_size, train_cfg.micro_batch_size
    if batch < 1 or micro < 0:
        raise ConfigError(f"'{section}.batch_size' must be >= 1 and '{section}.micro_batch_size' >= 0")
    if batch < world:
        raise ConfigError(
            f"'{section}.batch_size' = {batch} is smaller than the {world} ranks: every rank needs at least one "
            f"sample per step; raise {section}.batch_size to {world} or more, or use fewer ranks"
        )
    largest = math.ceil(batch / world)
    micro = min(micro, largest) if micro else largest
    accumulation = math.ceil(batch / (micro * world))
    if world * accumulation > batch:  # some rank would have an empty micro step
        fits = next(m for m in range(micro, largest + 1) if world * math.ceil(batch / (m * world)) <= batch)
        raise ConfigError(
            f"'{section}.micro_batch_size' = {micro} on {world} ranks needs {accumulation} micro steps, more than "
            f"the global batch of {batch} can fill on every rank; set {section}.micro_batch_size to {fits} or more"
        )
    plan = BatchPlan(batch, micro, accumulation, world)
    return BatchPlan(batch, max(plan.sizes(0)), accumulation, world)


def even_world_sizes(train_cfg: TrainConfig, up_to: int = 64) -> list[int]:
    """World sizes at which the plan splits the global batch evenly (what DeepSpeed needs)."""
    sizes = []
    for world in range(1, min(up_to, train_cfg.batch_size) + 1):
        try:
            if plan_batches(train_cfg, world).even:
                sizes.append(world)
        except ConfigError:
            pass
    return sizes


def rank_micro_batches(order, plan: BatchPlan, rank: int, start_micro: int = 0) -> list[list[int]]:
    """This rank's sample indices for every micro step of the epoch from ``start_micro`` on;
    ``order`` is the epoch's permutation (sampling.permutation). The tail that does not
    fill a global batch is dropped (a different tail each epoch)."""
    if not 0 <= rank < plan.world:
        raise ValueError(f"rank {rank} not in a world of {plan.world}")
    total = plan.micro_steps_per_epoch(len(order))
    if not 0 <= start_micro <= total:
        raise ValueError(f"start micro step {start_micro} outside 0..{total}")
    out = []
    for k in range(start_micro, total):
        step, micro = divmod(k, plan.accumulation)
        first = step * plan.global_batch + plan.slot_offset(micro, rank)
        out.append([int(i) for i in order[first : first + plan.slot_size(micro, rank)]])
    return out
