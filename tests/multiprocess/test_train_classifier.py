"""Stage 1 end to end on the tiny shards: validation before training, a real 2-rank DDP run,
SIGKILL mid-epoch + relaunch = bit-identical weights, finished runs left alone."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchrun_helpers as jobs

from mlps_dist.config import PdaConfig
from mlps_dist.stages import train_classifier
from mlps_dist.train.checkpoint import load_model_file

STEPS_PER_EPOCH = 8  # 32 train samples / global batch 4


def write_config(tmp_path, shards, name="run", **classifier) -> tuple[str, str]:
    run_dir = tmp_path / name
    section = {
        "model": "small38",
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.01,
        "ckpt_every_steps": 3,
        "log_every_steps": 1,
        "cam_images": 2,
        "pda": {"start_epoch": 1, "gamma_decay": 0.9},
        **classifier,
    }
    values = {
        "run_dir": str(run_dir),
        "seed": 5,
        "data": {"root": str(shards), "num_workers": 0},
        "classifier": section,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(values))
    return str(path), str(run_dir)


def test_pda_schedule_is_off_then_decays_to_the_floor():
    pda = PdaConfig(start_epoch=3, gamma_init=1.0, gamma_decay=0.5, gamma_min=0.2)
    gammas = [train_classifier.pda_gamma(pda, e) for e in range(7)]
    assert gammas[:3] == [None, None, None]
    assert gammas[3:] == [0.125, 0.125, 0.125, 0.125]  # decays from epoch 0; stops once <= 0.2


def test_public_pda_schedule():
    """gamma x0.98 at the end of every epoch while above 0.65, PDA from epoch 3 (0.941)."""
    pda = PdaConfig()
    gammas = [train_classifier.pda_gamma(pda, e) for e in range(30)]
    assert gammas[:3] == [None, None, None]
    assert gammas[3] == pytest.approx(0.98**3) and round(gammas[3], 3) == 0.941
    assert gammas[21] == pytest.approx(0.98**21) and gammas[21] > 0.65
    assert gammas[22] == gammas[29] == pytest.approx(0.98**22)  # the first value <= 0.65 is kept


def test_cam_overlay_row_puts_one_panel_per_class_beside_the_patch():
    rgb = np.full((6, 5, 3), 100, np.uint8)
    cams = np.stack([np.zeros((6, 5)), np.ones((6, 5))]).astype(np.float32)
    row = train_classifier.cam_overlay_row(rgb, cams)
    assert row.shape == (6, 15, 3) and row.dtype == np.uint8
    assert (row[:, :5] == 100).all() and row[0, 5, 2] > row[0, 10, 2]  # cold class is bluer


def _error_of(argv, capsys) -> str:
    assert train_classifier.main(argv) == 2
    return capsys.readouterr().err


def test_problems_are_reported_before_training(tmp_path, tiny_shards, capsys):
    cfg, run_dir = write_config(tmp_path, tiny_shards)
    assert "unknown key 'classifier.epoch'" in _error_of(["--config", cfg, "classifier.epoch=3"], capsys)
    assert "'classifier.num_classes' = 5" in _error_of(["--config", cfg, "classifier.num_classes=5"], capsys)
    # Uneven micro batches are fine for DDP; DeepSpeed refuses them before building the model.
    uneven = ["classifier.batch_size=5", "classifier.micro_batch_size=2", "classifier.parallel=deepspeed"]
    assert "equal micro batches" in _error_of(["--config", cfg, *uneven], capsys)
    assert "info.json does not exist" in _error_of(["--config", cfg, f"data.root={tmp_path / 'none'}"], capsys)

    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    (broken / "train-000002.tar").unlink()
    assert "train-000002.tar is listed" in _error_of(["--config", cfg, f"data.root={broken}"], capsys)

    step = os.path.join(run_dir, "classifier", "checkpoints", "step-00000003")
    os.makedirs(step)
    open(os.path.join(step, "state.pt"), "wb").write(b"PK\x03\x04 not a checkpoint")
    open(os.path.join(run_dir, "classifier", "checkpoints", "latest"), "w").write("step-00000003")
    assert "state.pt cannot be read" in _error_of(["--config", cfg], capsys)
    torch.save(
        {"progress": {}, "meta": {"name": "resnet38d", "num_classes": 4, "parallel": "ddp"}},
        os.path.join(step, "state.pt"),
    )
    assert "name='resnet38d', this run has name='small38'" in _error_of(["--config", cfg], capsys)
    assert not os.path.exists(os.path.join(run_dir, "classifier", "model.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards):
    """An uninterrupted 2-rank DDP run through the same engine; every rank dumps its weights."""
    tmp = tmp_path_factory.mktemp("classifier_reference")
    cfg, run_dir = write_config(tmp, tiny_shards)
    result = jobs.run(["tests/support/engine_worker.py", str(tmp / "out"), "--task", "classifier", "--config", cfg])
    assert result.returncode == 0, result.stdout[-4000:]
    return tmp


@pytest.mark.slow
def test_ddp_ranks_agree_and_artefacts_are_written(reference):
    rank0 = jobs.load_weights(reference / "out" / "weights-rank0.pt")
    jobs.assert_equal_weights(rank0, jobs.load_weights(reference / "out" / "weights-rank1.pt"))
    state, meta = load_model_file(reference / "run" / "classifier" / "model.pt")
    jobs.assert_equal_weights(state, rank0)
    assert meta["name"] == "small38" and meta["num_classes"] == 4 and len(meta["classes"]) == 4
    assert meta["config"]["classifier"]["batch_size"] == 4
    _, best = load_model_file(reference / "run" / "classifier" / "best.pt")
    assert {"acc", "f1", "miou", "score"} <= set(best["metrics"]) and best["epoch"] in (0, 1)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_relaunch_gives_identical_weights(tmp_path, tiny_shards, reference):
    cfg, run_dir = write_config(tmp_path, tiny_shards)
    command = ["-m", "mlps_dist.stages.train_classifier", "--config", cfg]
    checkpoints = tmp_path / "run" / "classifier" / "checkpoints"
    job = jobs.start(command)
    mid_epoch = lambda: (step := jobs.latest_step(checkpoints)) > 0 and step % STEPS_PER_EPOCH > 0  # noqa: E731
    jobs.wait_for(mid_epoch, job, "a mid-epoch checkpoint")
    jobs.kill_job(job)  # SIGKILL to torchrun and both workers: no chance to clean up
    killed_at = jobs.latest_step(checkpoints)
    assert 3 <= killed_at < 2 * STEPS_PER_EPOCH
    assert not (tmp_path / "run" / "classifier" / "model.pt").exists()

    relaunch = jobs.run(command)
    assert relaunch.returncode == 0, relaunch.stdout[-4000:]
    assert f"resumed from {checkpoints / f'step-{killed_at:08d}'}" in relaunch.stdout
    resumed, _ = load_model_file(tmp_path / "run" / "classifier" / "model.pt")
    expected, _ = load_model_file(reference / "run" / "classifier" / "model.pt")
    jobs.assert_equal_weights(resumed, expected)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb" / "classifier")).Reload()
    assert {"train/loss", "train/lr", "train/pda_gamma", "val/acc", "val/f1", "val/miou"} <= set(
        events.Tags()["scalars"]
    )
    assert {"cam/pda_off/0", "cam/pda_off/1", "cam/pda_on/0", "cam/pda_on/1"} <= set(events.Tags()["images"])

    model_file = tmp_path / "run" / "classifier" / "model.pt"
    before = model_file.stat().st_mtime_ns
    again = jobs.run(command, nproc=0)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert model_file.stat().st_mtime_ns == before
