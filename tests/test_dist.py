"""Rank/world helpers: the exactly-once partition and single-process fallbacks."""

import pytest
import torch

from mlps_dist import dist


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_partition_covers_every_index_once(n, world):
    seen = []
    sizes = []
    for rank in range(world):
        part = dist.partition(n, world, rank)
        seen.extend(part)
        sizes.append(len(part))
    assert sorted(seen) == list(range(n))
    assert max(sizes) - min(sizes) <= 1


def test_partition_rejects_bad_rank():
    with pytest.raises(ValueError):
        dist.partition(10, 2, 2)


def test_single_process_collectives_are_identity():
    t = torch.arange(4)
    assert dist.all_reduce_sum(t) is t and t.tolist() == [0, 1, 2, 3]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5
    assert dist.get_world_size() == 1 and dist.is_main()
    dist.barrier()
