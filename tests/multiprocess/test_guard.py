"""The training guard: a non-finite, frozen or collapsed run is noticed, rolled back to the
last good checkpoint with a lower LR, or stopped with exit status 2 and one message; a
collapsed classifier never reaches stage 2 or the gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchrun_helpers as jobs

from mlps_dist.config import GuardConfig
from mlps_dist.models import create_classifier
from mlps_dist.predict import gate
from mlps_dist.run.runlog import RunLog
from mlps_dist.train.checkpoint import Checkpointer, load_model_file, save_model_file
from mlps_dist.train.guard import ModelCollapsed, RolledBack, TrainingFailed, TrainingHealth, refuse_collapsed


class _Wrapped:
    """The least a Checkpointer needs to save a bare module (DDP layout, one process)."""

    kind = "ddp"

    def __init__(self):
        self.module = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)


def _health(tmp_path, **cfg) -> tuple[TrainingHealth, Checkpointer]:
    ckpts = Checkpointer(tmp_path / "checkpoints", keep_last=1)
    log = RunLog(tmp_path, "stage", tensorboard=False)
    return TrainingHealth(GuardConfig(**cfg), "classifier", tmp_path / "health.json", ckpts, log), ckpts


def test_frozen_loss_is_noticed_after_k_intervals_and_rolls_back_to_the_good_checkpoint(tmp_path):
    health, ckpts = _health(tmp_path, frozen_intervals=3, max_rollbacks=1, lr_factor=0.5)
    model = _Wrapped()
    good = ckpts.save(8, model, {"progress": {}, "meta": {}})
    health.mark_good(good)
    newer = ckpts.save(12, model, {"progress": {}, "meta": {}})
    assert ckpts.good() == good and good.is_dir()  # keep_last=1 does not prune the good one
    for value in (0.9, 0.8):  # a falling loss is healthy
        health.add_step_loss(value)
        health.check_losses(epoch=2, step=1)
    for _ in range(2):  # two identical intervals after a different one: not yet frozen
        health.add_step_loss(math.log(2))
        health.check_losses(epoch=2, step=2)
    health.add_step_loss(math.log(2))
    with pytest.raises(RolledBack):
        health.check_losses(epoch=3, step=30)
    assert ckpts.latest() == good and not newer.exists()
    decisions = json.loads((tmp_path / "health.json").read_text())
    assert decisions["lr_scale"] == 0.5 and decisions["rollbacks"][0]["to"] == good.name
    assert "loss frozen at 0.6931" in decisions["rollbacks"][0]["symptom"]

    again, _ = _health(tmp_path, frozen_intervals=3, max_rollbacks=1)  # what a relaunch reads
    assert again.lr_scale == 0.5
    again.add_step_loss(float("nan"))
    with pytest.raises(TrainingFailed) as failure:
        again.check_losses(epoch=4, step=40)
    message = str(failure.value)
    assert "epoch 4" in message and "non-finite loss" in message and "'classifier.lr'" in message
    assert "after 1 rollback(s)" in message


def test_one_dip_is_noise_two_in_a_row_are_a_collapse(tmp_path):
    health, _ = _health(tmp_path, watch=["score", "f1"], max_rollbacks=0)  # collapse_patience 2 (default)
    health.check_validation({"score": 0.6, "f1": 0.8}, epoch=0, step=5)
    health.check_validation({"score": 0.6, "f1": 0.3}, epoch=1, step=10)  # one noisy dip: tolerated
    assert health.suspect and health.below == 1
    health.check_validation({"score": 0.6, "f1": 0.7}, epoch=2, step=15)
    assert not health.suspect and health.below == 0
    health.check_validation({"score": 0.6, "f1": 0.3}, epoch=3, step=20)
    with pytest.raises(TrainingFailed, match=r"epoch 4 .*validation collapsed: f1 0.2000 .*2 validations in a row"):
        health.check_validation({"score": 0.6, "f1": 0.2}, epoch=4, step=25)


def test_collapsed_validation_relative_to_the_best(tmp_path):
    health, ckpts = _health(tmp_path, watch=["score", "f1"], max_rollbacks=0, collapse_patience=1)
    health.check_validation({"score": 0.1, "f1": 0.15}, epoch=0, step=5)  # below collapse_min_best: noise
    health.check_validation({"score": 0.6, "f1": 0.99}, epoch=1, step=10)
    health.check_validation({"score": 0.55, "f1": 0.9}, epoch=2, step=15)  # a dip is not a collapse
    assert health.best == {"score": 0.6, "f1": 0.99}
    with pytest.raises(TrainingFailed, match=r"epoch 3 .*validation collapsed: f1 0.0000 \(best 0.9900\)"):
        health.check_validation({"score": 0.5, "f1": 0.0}, epoch=3, step=20)


def test_disabled_guard_still_refuses_a_collapsed_final_model(tmp_path):
    health, _ = _health(tmp_path, enabled=False, collapse_patience=1)
    health.check_validation({"score": 0.8}, epoch=0, step=1)
    health.add_step_loss(float("inf"))
    health.check_losses(epoch=1, step=2)  # disabled: no rollback, no stop
    health.check_validation({"score": 0.01}, epoch=1, step=2)
    with pytest.raises(TrainingFailed, match="collapsed model at epoch 1"):
        health.check_final(1)


def test_resume_state_carries_the_window_and_pending_losses(tmp_path):
    health, _ = _health(tmp_path, frozen_intervals=2, max_rollbacks=0)
    health.add_step_loss(0.5)
    health.check_losses(0, 1)
    health.add_step_loss(0.5)  # pending at the checkpoint
    state = health.state_dict()
    resumed, _ = _health(tmp_path / "other", frozen_intervals=2, max_rollbacks=0)
    resumed.load_state_dict(state)
    with pytest.raises(TrainingFailed, match="loss frozen at 0.5000"):
        resumed.check_losses(0, 2)


def test_consumers_refuse_a_collapsed_classifier(tmp_path):
    run = tmp_path / "run"
    model = create_classifier("small38", 4)
    meta = {
        "name": "small38",
        "num_classes": 4,
        "classes": list("abcd"),
        "config": {},
        "epoch": 5,
        "metrics": {"score": 0.3, "f1": 0.0},
        "health": {
            "collapsed": False,
            "best": {"score": 0.5, "f1": 0.99},
            "watch": ["score", "f1"],
            "collapse_ratio": 0.5,
            "collapse_min_best": 0.2,
        },
    }
    save_model_file(run / "classifier" / "model.pt", model.state_dict(), meta)
    with pytest.raises(ModelCollapsed, match=r"records a collapsed model.*'classifier.checkpoint'"):
        gate.load_classifier(run, 4, checkpoint="last")
    healthy = {**meta, "epoch": 3, "metrics": {"score": 0.5, "f1": 0.99}}
    save_model_file(run / "classifier" / "best.pt", model.state_dict(), healthy)
    loaded, info = gate.load_classifier(run, 4, checkpoint="best")
    assert info["selection"] == {"checkpoint": "best", "file": "classifier/best.pt", "epoch": 3, "score": 0.5}
    refuse_collapsed({"metrics": {"score": 0.4}}, "x")  # files without health records pass


WORKER = "tests/support/engine_worker.py"


def _regression_config(tmp_path, name: str, **guard) -> tuple[str, Path]:
    """The engine test task (tests/support/engine_worker.py) at 1000x its LR (0.05 -> 50): the loss
    explodes to inf within the first epoch."""
    run_dir = tmp_path / name
    section = {
        "epochs": 3,
        "batch_size": 8,
        "lr": 50.0,
        "ckpt_every_steps": 3,
        "log_every_steps": 1,
        "guard": {"max_rollbacks": 2, **guard},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"run_dir": str(run_dir), "seed": 3, "segmenter": section}))
    return str(path), run_dir


def test_learning_rate_1000x_too_large_rolls_back_twice_then_exits_2(tmp_path):
    cfg, run_dir = _regression_config(tmp_path, "run")
    result = jobs.run([WORKER, str(tmp_path / "out"), "--config", cfg, "segmenter.micro_batch_size=8"], nproc=0)
    assert result.returncode == 2, result.stdout[-3000:]
    message = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "training failed at epoch 0" in message[0]
    assert "non-finite loss" in message[0] and "after 2 rollback(s)" in message[0] and "'regression.lr'" in message[0]
    decisions = json.loads((run_dir / "regression" / "health.json").read_text())
    assert [r["lr_scale"] for r in decisions["rollbacks"]] == [0.5, 0.25]
    assert not (run_dir / "regression" / "model.pt").exists()


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_rollback_and_sigkill_after_it_resumes_exactly(tmp_path):
    """2 ranks: the diverging run rolls back once (LR x 0.001 = 0.05) and finishes; a run
    SIGKILLed after its rollback and relaunched ends with the same weights on both ranks."""
    cfg, run_dir = _regression_config(tmp_path, "run", max_rollbacks=1, lr_factor=0.001)
    reference = jobs.run([WORKER, str(tmp_path / "out"), "--config", cfg, "--dropout", "0"])
    assert reference.returncode == 0, reference.stdout[-3000:]
    ref0 = jobs.load_weights(tmp_path / "out" / "weights-rank0.pt")
    jobs.assert_equal_weights(ref0, jobs.load_weights(tmp_path / "out" / "weights-rank1.pt"))
    assert all(torch.isfinite(v).all() for v in ref0.values())
    decisions = json.loads((run_dir / "regression" / "health.json").read_text())
    assert len(decisions["rollbacks"]) == 1 and decisions["rollbacks"][0]["to"] is None
    _, meta = load_model_file(run_dir / "regression" / "model.pt")
    assert meta["health"]["rollbacks"] == 1 and meta["health"]["lr_scale"] == 0.001

    cfg, run_dir = _regression_config(tmp_path, "killed", max_rollbacks=1, lr_factor=0.001)
    checkpoints = run_dir / "regression" / "checkpoints"
    job = jobs.start([WORKER, str(tmp_path / "out2"), "--config", cfg, "--dropout", "0", "--step-seconds", "0.2"])
    health_file = run_dir / "regression" / "health.json"
    after_rollback = lambda: health_file.is_file() and jobs.latest_step(checkpoints) >= 9  # noqa: E731
    jobs.wait_for(after_rollback, job, "a checkpoint after the rollback", timeout=300)
    jobs.kill_job(job)
    relaunch = jobs.run([WORKER, str(tmp_path / "out2"), "--config", cfg, "--dropout", "0"])
    assert relaunch.returncode == 0, relaunch.stdout[-3000:]
    for rank in (0, 1):
        jobs.assert_equal_weights(jobs.load_weights(tmp_path / "out2" / f"weights-rank{rank}.pt"), ref0)


@pytest.mark.slow
def test_deepspeed_ranks_roll_back_together_and_finish(tmp_path):
    cfg, run_dir = _regression_config(tmp_path, "run", max_rollbacks=1, lr_factor=0.001)
    result = jobs.run(
        [
            WORKER,
            str(tmp_path / "out"),
            "--config",
            cfg,
            "--dropout",
            "0",
            "segmenter.epochs=2",
            "segmenter.parallel=deepspeed",
            "segmenter.deepspeed_config=configs/deepspeed/zero1.json",
        ]
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("rolling back to the start") == 1  # logged by rank 0 only
    rank0 = jobs.load_weights(tmp_path / "out" / "weights-rank0.pt")
    jobs.assert_equal_weights(rank0, jobs.load_weights(tmp_path / "out" / "weights-rank1.pt"))
    assert all(torch.isfinite(v).all() for v in rank0.values())
