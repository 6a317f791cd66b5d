"""What the DALI pipeline's ``fn.external_source`` reads: a schedule (which samples, which
augmentation parameters, in each of the pipeline's epochs) and the batch callable over it.

DALI numbers a pipeline's epochs 0, 1, ... (``BatchInfo.epoch_idx``, one more after each
``reset()``). A schedule maps that number to the training epoch, so one pipeline can serve
a whole run (``gpu.dali_pipeline_per_run``): a pipeline built for training epoch ``e`` from
micro step ``s`` reads, in its epoch ``k``, training epoch ``e + k`` from micro step ``s`` if
``k == 0`` and from 0 after. The batches and parameters are those of sampling.py, batching.py
and augment.py, exactly as when a pipeline is built per epoch, so the sample order and a
resume's position do not depend on how long a pipeline lives.

Both are pure functions of their arguments and picklable: DALI's parallel source workers
(``data.dali_source_workers``) hold copies made when the pipeline is built, which nothing
can update later.
"""

from __future__ import annotations

from dataclasses import astuple

import numpy as np

from mlps_dist.config import AugmentConfig
from mlps_dist.data.augment import IDENTITY, photometric_inputs, sample_params
from mlps_dist.data.batching import BatchPlan, rank_micro_batches
from mlps_dist.data.sampling import permutation


class TrainSchedule:
    """A rank's training micro batches, from (``first_epoch``, micro step ``first_micro``) on."""

    def __init__(
        self,
        n: int,
        seed: int,
        plan: BatchPlan,
        rank: int,
        augment: AugmentConfig,
        first_epoch: int,
        first_micro: int = 0,
    ):
        self.n, self.seed, self.plan, self.rank, self.augment = n, seed, plan, rank, augment
        self.first_epoch, self.first_micro = first_epoch, first_micro

    def epoch(self, k: int) -> int:
        return self.first_epoch + k

    def batches(self, k: int) -> list[list[int]]:
        order = permutation(self.n, self.seed, self.epoch(k))
        return rank_micro_batches(order, self.plan, self.rank, self.first_micro if k == 0 else 0)

    def params(self, k: int, index: int):
        return sample_params(self.augment, self.seed, self.epoch(k), index)

    def max_batch(self) -> int:
        return max(self.plan.sizes(self.rank))

    def identity(self) -> tuple:
        """What the pipeline's source depends on, apart from where it starts."""
        return "train", self.n, self.seed, self.plan, self.rank, astuple(self.augment)

    def continues_with(self, k: int, other: TrainSchedule) -> bool:
        """Whether this schedule's epoch ``k`` is the first epoch of ``other`` (same identity)."""
        return self.epoch(k) == other.first_epoch and other.first_micro == (self.first_micro if k == 0 else 0)


class FixedSchedule:
    """The same batches in every epoch, without augmentation (the eval loaders)."""

    def __init__(self, batches: list[list[int]]):
        self.fixed = [list(b) for b in batches]

    def batches(self, k: int) -> list[list[int]]:
        return self.fixed

    def params(self, k: int, index: int):
        return IDENTITY

    def max_batch(self) -> int:
        return max((len(b) for b in self.fixed), default=1)

    def identity(self) -> tuple:
        return "fixed", tuple(tuple(b) for b in self.fixed)

    def continues_with(self, k: int, other: FixedSchedule) -> bool:
        return True


def _as_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8)


class BatchSource:
    """Batch ``info.iteration`` of the schedule's epoch ``info.epoch_idx`` as input lists for
    ``fn.external_source(num_outputs=..., batch_info=True)``; StopIteration past the end.

    ``masks_of`` must be a module-level callable, a partial or a bound method of a picklable
    object, so that spawned worker processes can run it."""

    def __init__(self, reader, schedule, num_masks, masks_of, with_mask, ops=(False, False)):
        self.reader, self.schedule = reader, schedule
        self.num_masks, self.masks_of, self.with_mask = num_masks, masks_of, with_mask
        self.ops, self.num_extra = ops, sum(ops)  # blur kernel and/or HED map columns
        self._epoch: tuple[int, list] | None = None  # (k, its batches): one permutation per epoch

    @property
    def num_outputs(self) -> int:
        return 6 + self.num_extra + self.num_masks

    def batches(self, k: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != k:
            self._epoch = (k, self.schedule.batches(k))
        return self._epoch[1]

    def __call__(self, info):
        k, iteration = info.epoch_idx, info.iteration
        batches = self.batches(k)
        if iteration >= len(batches):  # DALI asks past the end while prefetching: the epoch ends
            raise StopIteration
        cols: list[list[np.ndarray]] = [[] for _ in range(self.num_outputs)]
        for index in batches[iteration]:
            sample = self.reader.read(index)
            p = self.schedule.params(k, index)
            pngs = list(self.masks_of(index)) if self.masks_of else ([sample["mask.png"]] if self.with_mask else [])
            values = (
                [
                    _as_bytes(sample["image"]),
                    np.array(p.transpose),
                    np.array(int(p.hflip), np.int32),
                    np.array(int(p.vflip), np.int32),
                    np.asarray(p.gain, np.float32),
                    np.array(p.offset * 255.0, np.float32),
                ]
                + photometric_inputs(p, self.ops)
                + [_as_bytes(png) for png in pngs]
            )
            for col, value in zip(cols, values):
                col.append(value)
        return tuple(cols)
