"""DALI pipelines kept from one epoch to the next (``gpu.dali_pipeline_per_run``).

Building a pipeline costs its graph, its buffers and, with ``data.dali_source_workers``, the
start of its worker processes (a few seconds each where they are spawned, on a GPU rank).
With the key on, a loader that read its epoch to the end hands its pipeline back here, reset
to the start of its next epoch (dali_source.py: the schedule says which training epoch
that is); the next loader of the same kind takes it instead of building one. The training
loader then builds once per run and the eval loader once for all its validations.

A pipeline comes back only from a clean epoch end: one that was left mid-epoch (a
preemption, an error, an abandoned iterator) still holds prefetched batches and is dropped,
so the next loader builds a new one. A pipeline that is out is held by one loader at a time;
its key names everything the pipeline and its source were built from. The key is off by
default until measured on a GPU: with it on, the train and eval pipelines, their worker
processes and their buffers (DALI's device memory pool, on a GPU) stay for the whole run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

KEEP = 4  # pipelines at most: a stage holds two (train, eval); more are older runs in this process


class PipelinePool:
    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._lock = threading.Lock()
        self._idle: OrderedDict = OrderedDict()  # key -> (pipeline, schedule, its next DALI epoch)

    def take(self, key, schedule):
        """(pipeline, its schedule, k): an idle pipeline under ``key`` whose next epoch ``k`` reads
        what ``schedule`` reads in its first; None where there is none."""
        with self._lock:
            entry = self._idle.pop(key, None)
        if entry is None:
            return None
        if not entry[1].continues_with(entry[2], schedule):
            return None  # another epoch (a rollback, a resume in this process): built afresh
        return entry

    def give_back(self, key, pipe, schedule, k: int) -> None:
        """``pipe`` has read its epoch ``k - 1`` to the end and been reset."""
        with self._lock:
            self._idle.pop(key, None)
            self._idle[key] = (pipe, schedule, k)
            while len(self._idle) > self.keep:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()

    def __len__(self) -> int:
        return len(self._idle)


POOL = PipelinePool()
