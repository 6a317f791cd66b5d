"""Which samples each rank sees at each step: a pure function of (seed, epoch).

Epoch ``e`` visits ``permutation(n, seed, e)``; consecutive blocks of ``batch * world``
samples form the global batch of one step, and rank ``r`` takes the ``r``-th slice of
``batch`` samples of it. Hence

- every rank gets ``n // (batch * world)`` steps (the tail that does not fill a global batch
  is dropped; it is a different tail each epoch);
- the global batch of step ``s`` is the same set of samples for any (batch, world) with the
  same product, and with gradient accumulation over ``A`` micro steps the samples of one
  optimizer step are the same set whatever the split into ranks and micro steps;
- a loader started at step ``k`` continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import numpy as np


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    return n // (batch_size * world)


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    # SeedSequence mixes the words properly: (seed, epoch) pairs never share a stream.
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, stream]))


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return _rng(seed, epoch, 0).permutation(n)


def eval_batches(indices: range | list[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches over this rank's share; each batch is fetched by one worker."""
    indices = list(indices)
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
