"""The batch plan on any world size: every sample of a global batch in exactly one slot,
the same number of micro steps on every rank, loss weights that make the all-reduced
gradient that of the whole global batch (checked against one process over gloo with 1, 3
and 8 ranks), and DeepSpeed refusing what it cannot run."""

from __future__ import annotations

import numpy as np
import plan_gradients  # noqa: E402
import pytest
import torch
import torchrun_helpers as jobs

from mlps_dist.config import ConfigError, TrainConfig
from mlps_dist.data.batching import even_world_sizes, plan_batches, rank_micro_batches


@pytest.mark.parametrize("world", [1, 2, 3, 5, 6, 7, 8, 16, 20])
@pytest.mark.parametrize("micro", [0, 1, 2, 3])
def test_every_sample_of_a_global_batch_in_exactly_one_slot(world, micro):
    cfg = TrainConfig(batch_size=20, micro_batch_size=micro)
    if micro and world * -(-20 // (micro * world)) > 20:  # a micro step could not fill every rank
        with pytest.raises(ConfigError, match="micro_batch_size' = .* or more"):
            plan_batches(cfg, world)
        return
    plan = plan_batches(cfg, world)
    assert plan.world * plan.accumulation * plan.micro_batch >= 20
    order = np.random.default_rng(0).permutation(103)
    per_rank = [rank_micro_batches(order, plan, r) for r in range(world)]
    assert {len(b) for b in per_rank} == {plan.steps_per_epoch(103) * plan.accumulation} == {5 * plan.accumulation}
    for step in range(5):  # the step's 20 samples are the same whatever the split
        window = slice(step * plan.accumulation, (step + 1) * plan.accumulation)
        seen = sorted(i for rank in per_rank for batch in rank[window] for i in batch)
        assert seen == sorted(order[step * 20 : (step + 1) * 20].tolist())
    assert all(1 <= len(b) <= plan.micro_batch for rank in per_rank for b in rank)
    weights = sum(plan.loss_weight(m, r) for m in range(plan.accumulation) for r in range(world))
    assert weights == pytest.approx(world)  # DDP divides by world: the weights sum to one global mean
    if plan.even:
        assert [plan.loss_weight(m, r) for m in range(plan.accumulation) for r in range(world)] == pytest.approx(
            [1 / plan.accumulation] * plan.slots
        )


def test_resume_continues_the_same_micro_batches():
    plan = plan_batches(TrainConfig(batch_size=20, micro_batch_size=2), 7)
    order = np.random.default_rng(1).permutation(64)
    full = rank_micro_batches(order, plan, 3)
    assert rank_micro_batches(order, plan, 3, start_micro=2 * plan.accumulation) == full[2 * plan.accumulation :]


def test_plan_errors_and_even_world_sizes():
    with pytest.raises(ConfigError, match="'segmenter.batch_size' = 4 is smaller than the 8 ranks"):
        plan_batches(TrainConfig(batch_size=4), 8, "segmenter")
    assert even_world_sizes(TrainConfig(batch_size=20)) == [1, 2, 4, 5, 10, 20]
    assert even_world_sizes(TrainConfig(batch_size=16, micro_batch_size=3), 16) == [4, 8, 16]  # 16 = 3+3+3+3+2+2 on 1
    assert plan_batches(TrainConfig(batch_size=20), 8).describe() == "global batch 20 = 3 x 4 ranks + 2 x 4 ranks"
    assert plan_batches(TrainConfig(batch_size=20), 4).describe() == "global batch 20 = 5 x 4 ranks x 1 accumulation"


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3, 8])
def test_all_reduced_gradient_equals_the_single_process_gradient(tmp_path, world):
    result = jobs.run(["tests/support/dist_scripts/plan_gradients.py", str(tmp_path)], nproc=world, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    reference, reference_loss = plan_gradients.single_process_gradient()
    for micro in plan_gradients.MICRO_BATCH_SIZES:
        got = torch.load(tmp_path / f"grads-w{world}-m{micro}.pt", weights_only=True)
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"{name}, {got['plan']}")
        assert got["loss"] == pytest.approx(reference_loss, rel=1e-6)
