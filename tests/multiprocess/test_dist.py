"""Rank/world helpers: the exactly-once partition, single-process fallbacks, the GPU count check."""

import os

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


@pytest.mark.slow
def test_preemption_vote_reaches_every_rank_one_step_later_without_a_blocking_collective(tmp_path):
    """poll() reads the vote started by the previous step, so every rank stops at the same
    step, one after the signal; agreed() (epoch ends) settles the vote in flight first."""
    import json

    import torchrun_helpers as jobs

    result = jobs.run(["tests/support/dist_scripts/preemption_votes.py", str(tmp_path)], nproc=3, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    records = [json.loads((tmp_path / f"votes-r{rank}.json").read_text()) for rank in range(3)]
    for record in records:
        # signalled before the poll of step 3 -> that poll starts the vote, step 4's reads it
        assert record["polls"] == [False, False, False, False, True], record
        assert record["agreed"] is True


def test_more_ranks_than_visible_gpus_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "_ENV", dist.DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2))
    with pytest.raises(dist.TooManyRanks, match="2 ranks on this node .* but 1 GPU") as exc:
        dist.device()
    assert "\n" not in str(exc.value) and exc.value.exit_code == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.device() == torch.device("cuda", 1)


def test_the_cpu_suite_and_its_jobs_see_no_gpu():
    """CPU tests stay CPU tests on a GPU node: CUDA is hidden here and in torchrun children."""
    import torchrun_helpers as jobs

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    assert jobs.job_env()["CUDA_VISIBLE_DEVICES"] == ""
