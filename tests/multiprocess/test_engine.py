"""The shared training loop under real torchrun jobs: DDP and DeepSpeed ZeRO-1/2 agree,
gradient accumulation keeps the global batch, and preemption checkpoints, exits 75 and
resumes to the same weights. The model is a small MLP (tests/support/engine_worker.py)."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
import torchrun_helpers as jobs

from mlps_dist.config import ConfigError, TrainConfig
from mlps_dist.core.errors import EXIT_PREEMPTED
from mlps_dist.data import batching
from mlps_dist.train import parallel
from mlps_dist.train.engine import derive_seed

WORKER = "tests/support/engine_worker.py"
STEPS_PER_EPOCH = 8  # 64 samples / global batch 8


def write_config(tmp_path, name: str, **section) -> tuple[str, str]:
    run_dir = tmp_path / name
    values = {"epochs": 2, "batch_size": 8, "lr": 0.05, "ckpt_every_steps": 3, "log_every_steps": 1, **section}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"run_dir": str(run_dir), "seed": 3, "segmenter": values}))
    return str(path), str(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank DDP run: the weights every other run is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg, _ = write_config(tmp, "run")
    # No dropout: runs with other world sizes draw other random streams, and must still match.
    result = jobs.run([WORKER, str(tmp / "out"), "--config", cfg, "--dropout", "0"])
    assert result.returncode == 0, result.stdout[-4000:]
    return tmp / "out"


def test_batch_plan_keeps_the_global_batch():
    assert batching.plan_batches(TrainConfig(batch_size=16), 2) == batching.BatchPlan(16, 8, 1, 2)
    assert batching.plan_batches(TrainConfig(batch_size=16, micro_batch_size=2), 2).accumulation == 4
    assert batching.plan_batches(TrainConfig(batch_size=16, micro_batch_size=16), 1).accumulation == 1
    with pytest.raises(ConfigError, match="'classifier.batch_size' = 3 is smaller than the 4 ranks"):
        batching.plan_batches(TrainConfig(batch_size=3), 4, "classifier")
    assert batching.plan_batches(TrainConfig(batch_size=16, micro_batch_size=3), 2).sizes(1) == [3, 3, 2]
    assert len({derive_seed(0, r) for r in range(64)} | {derive_seed(1, r) for r in range(64)}) == 128


def test_deepspeed_json_may_not_contradict_the_config(tmp_path):
    plan = batching.plan_batches(TrainConfig(batch_size=16), 2)
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 32}))
    with pytest.raises(ConfigError, match="clash.json: remove \\['train_batch_size'\\]"):
        parallel.deepspeed_config(TrainConfig(deepspeed_config=str(clash)), plan, amp_dtype=None)
    clash.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        parallel.deepspeed_config(TrainConfig(deepspeed_config=str(clash)), plan, amp_dtype=None)
    filled = parallel.deepspeed_config(
        TrainConfig(deepspeed_config="configs/deepspeed/zero2.json", grad_clip=1.0, micro_batch_size=4),
        batching.plan_batches(TrainConfig(batch_size=16, micro_batch_size=4), 2),
        None,
    )
    assert (
        filled["train_batch_size"],
        filled["train_micro_batch_size_per_gpu"],
        filled["gradient_accumulation_steps"],
    ) == (16, 4, 2)
    assert filled["zero_optimization"]["stage"] == 2 and filled["fp16"] == {"enabled": False}


@pytest.mark.slow
def test_ddp_ranks_agree_and_training_moved_the_weights(reference):
    rank0, rank1 = jobs.load_weights(reference / "weights-rank0.pt"), jobs.load_weights(reference / "weights-rank1.pt")
    jobs.assert_equal_weights(rank0, rank1)
    torch.manual_seed(3)
    from engine_worker import SmallMlp

    initial = SmallMlp(0.0).state_dict()
    assert all(not torch.equal(initial[k], rank0[k]) for k in rank0)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_zero_ranks_agree_with_each_other_and_with_ddp(tmp_path, reference, zero):
    cfg, run_dir = write_config(
        tmp_path, "ds", parallel="deepspeed", keep_last=10, deepspeed_config=f"configs/deepspeed/zero{zero}.json"
    )
    result = jobs.run([WORKER, str(tmp_path / "out"), "--config", cfg, "--dropout", "0"])
    assert result.returncode == 0, result.stdout[-4000:]
    rank0, rank1 = (jobs.load_weights(tmp_path / "out" / f"weights-rank{r}.pt") for r in (0, 1))
    jobs.assert_equal_weights(rank0, rank1)
    ddp = jobs.load_weights(reference / "weights-rank0.pt")
    for key in ddp:  # same SGD, schedule and data: only the reduction code differs
        torch.testing.assert_close(rank0[key], ddp[key], rtol=1e-5, atol=1e-6)
    checkpoints = tmp_path / "ds" / "regression" / "checkpoints"
    assert (checkpoints / "step-00000003" / "ds").is_dir()
    if zero == 2:  # back to the state right after the first mid-epoch checkpoint, then rerun
        (checkpoints / "latest").write_text("step-00000003")
        (tmp_path / "ds" / "regression" / "model.pt").unlink()
        rerun = jobs.run([WORKER, str(tmp_path / "out"), "--config", cfg, "--dropout", "0"])
        assert rerun.returncode == 0 and "resumed from" in rerun.stdout, rerun.stdout[-4000:]
        jobs.assert_equal_weights(jobs.load_weights(tmp_path / "out" / "weights-rank1.pt"), rank0)


@pytest.mark.slow
def test_one_rank_with_accumulation_matches_two_ranks(tmp_path, reference):
    cfg, _ = write_config(tmp_path, "one", micro_batch_size=2)  # 2 x 1 rank x 4 accumulation
    one = jobs.run([WORKER, str(tmp_path / "out"), "--config", cfg, "--dropout", "0"], nproc=0)
    assert one.returncode == 0, one.stdout[-4000:]
    assert "2 x 1 ranks x 4 accumulation" in one.stdout
    a, b = jobs.load_weights(tmp_path / "out" / "weights-rank0.pt"), jobs.load_weights(reference / "weights-rank0.pt")
    for key in a:  # the same 8 samples per optimizer step, summed in another order
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _scalar_steps(run_dir) -> list[int]:
    try:
        lines = open(os.path.join(run_dir, "log.jsonl")).read().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if '"kind": "scalars"' in line and '"train/loss"' in line]


@pytest.mark.slow
def test_signal_to_one_rank_checkpoints_exits_75_and_resumes_identically(tmp_path, reference):
    cfg, run_dir = write_config(tmp_path, "run", ckpt_every_steps=0)
    out = tmp_path / "out"
    job = jobs.start([WORKER, str(out), "--config", cfg, "--dropout", "0", "--step-seconds", "0.15"])
    jobs.wait_for(lambda: len(_scalar_steps(run_dir)) >= 2, job, "two training steps")
    os.kill(int((out / "pid-rank1").read_text()), signal.SIGUSR1)  # rank 0 is not signalled
    output, _ = job.communicate(timeout=120)
    # torchrun's failure report per rank. The first rank to exit makes torchrun SIGTERM the
    # other, which may still be tearing down: that one may show -15 instead of 75.
    exits = dict(re.findall(r"rank\s*:\s*(\d) \(local_rank: \d\)\s*exitcode\s*:\s*(-?\d+)", output))
    assert set(exits) == {"0", "1"} and str(EXIT_PREEMPTED) in exits.values(), output[-4000:]
    assert set(exits.values()) <= {str(EXIT_PREEMPTED), "-15"}, output[-4000:]
    checkpoints = tmp_path / "run" / "regression" / "checkpoints"
    stopped_at = jobs.latest_step(checkpoints)
    assert 2 <= stopped_at < 2 * STEPS_PER_EPOCH and max(_scalar_steps(run_dir)) == stopped_at
    assert sorted(p.name for p in (checkpoints / f"step-{stopped_at:08d}").iterdir()) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
        "state.pt",
    ]

    resumed = jobs.run([WORKER, str(out), "--config", cfg, "--dropout", "0"])
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    for rank in (0, 1):
        jobs.assert_equal_weights(
            jobs.load_weights(out / f"weights-rank{rank}.pt"), jobs.load_weights(reference / f"weights-rank{rank}.pt")
        )
    task_state = torch.load(out / "weights-rank0.pt", weights_only=True)["task"]
    assert len(task_state["epochs_started"]) == 3  # restored from the checkpoint, then the rerun's epochs


@pytest.mark.slow
def test_weight_average_is_what_validation_and_model_pt_see_and_resumes_exactly(tmp_path, reference):
    """segmenter.ema_decay > 0: training is untouched (the raw weights are the reference's);
    validation and model.pt get the average, which a preempted and resumed run reproduces."""
    whole_cfg, whole_dir = write_config(tmp_path, "whole", ema_decay=0.8)
    whole = jobs.run([WORKER, str(tmp_path / "whole_out"), "--config", whole_cfg, "--dropout", "0"])
    assert whole.returncode == 0, whole.stdout[-4000:]
    cfg, run_dir = write_config(tmp_path, "run", ema_decay=0.8, ckpt_every_steps=0)
    out = tmp_path / "out"
    job = jobs.start([WORKER, str(out), "--config", cfg, "--dropout", "0", "--step-seconds", "0.15"])
    jobs.wait_for(lambda: len(_scalar_steps(run_dir)) >= 2, job, "two training steps")
    os.kill(int((out / "pid-rank0").read_text()), signal.SIGUSR1)
    job.communicate(timeout=120)
    assert 2 <= jobs.latest_step(tmp_path / "run" / "regression" / "checkpoints") < 2 * STEPS_PER_EPOCH
    resumed = jobs.run([WORKER, str(out), "--config", cfg, "--dropout", "0"])
    assert resumed.returncode == 0, resumed.stdout[-4000:]

    averaged = jobs.load_weights(tmp_path / "whole_out" / "weights-rank0.pt")
    for rank in (0, 1):  # every rank validated the same average, the resumed run too
        jobs.assert_equal_weights(jobs.load_weights(tmp_path / "whole_out" / f"weights-rank{rank}.pt"), averaged)
        jobs.assert_equal_weights(jobs.load_weights(out / f"weights-rank{rank}.pt"), averaged)
    checkpoints = tmp_path / "whole" / "regression" / "checkpoints"
    final_state = torch.load(checkpoints / (checkpoints / "latest").read_text().strip() / "state.pt", weights_only=True)
    jobs.assert_equal_weights(final_state["model"], jobs.load_weights(reference / "weights-rank0.pt"))  # untouched
    assert final_state["ema"]["updates"] == 2 * STEPS_PER_EPOCH
    jobs.assert_equal_weights(final_state["ema"]["weights"], averaged)
    jobs.assert_equal_weights(jobs.load_weights(tmp_path / "whole" / "regression" / "model.pt"), averaged)
    assert any(not torch.equal(averaged[k], final_state["model"][k]) for k in averaged)  # an average


@pytest.mark.slow
def test_sigterm_to_a_single_process_exits_75_after_a_checkpoint(tmp_path):
    cfg, run_dir = write_config(tmp_path, "run", ckpt_every_steps=0, micro_batch_size=8)
    job = jobs.start([WORKER, str(tmp_path / "out"), "--config", cfg, "--step-seconds", "0.1"], nproc=0)
    jobs.wait_for(lambda: len(_scalar_steps(run_dir)) >= 1, job, "a training step")
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=60)
    assert job.returncode == EXIT_PREEMPTED, output[-4000:]
    assert jobs.latest_step(tmp_path / "run" / "regression" / "checkpoints") >= 1


@pytest.mark.slow
def test_three_ranks_with_uneven_micro_batches_match_two_ranks(tmp_path, reference):
    """Global batch 8 on 3 ranks: 3 + 3 + 2 samples per step, weighted by their share; same
    epoch length, LR schedule and weights as the even 2-rank run."""
    cfg, _ = write_config(tmp_path, "three")
    result = jobs.run([WORKER, str(tmp_path / "out"), "--config", cfg, "--dropout", "0"], nproc=3)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "global batch 8 = 3 x 2 ranks + 2 x 1 ranks; 8 steps/epoch" in result.stdout
    ddp = jobs.load_weights(reference / "weights-rank0.pt")
    for rank in range(3):
        weights = jobs.load_weights(tmp_path / "out" / f"weights-rank{rank}.pt")
        for key in ddp:
            torch.testing.assert_close(weights[key], ddp[key], rtol=1e-5, atol=1e-6)


def test_deepspeed_refuses_uneven_micro_batches_and_zero3_before_building(tmp_path):
    plan = batching.plan_batches(TrainConfig(batch_size=20), 8)
    with pytest.raises(ConfigError, match=r"equal micro batches .* runs on 1, 2, 4, 5, 10, 20 ranks"):
        parallel.deepspeed_config(
            TrainConfig(batch_size=20, deepspeed_config="configs/deepspeed/zero1.json"), plan, amp_dtype=None
        )
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO stage 3 is not supported"):
        parallel.deepspeed_config(
            TrainConfig(batch_size=16, deepspeed_config=str(zero3)),
            batching.plan_batches(TrainConfig(batch_size=16), 2),
            amp_dtype=None,
        )


def test_training_log_has_throughput_and_memory_per_epoch(reference):
    records = [json.loads(line) for line in open(reference.parent / "run" / "log.jsonl")]
    speed = [r for r in records if r["kind"] == "scalars" and "speed/images_per_s" in r]
    assert [r["step"] for r in speed] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # one per epoch
    assert all(r["speed/images_per_s"] > 0 and r["speed/step_s"] > 0 and r["speed/peak_rss_mib"] > 50 for r in speed)
