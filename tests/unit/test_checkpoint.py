"""Atomic checkpoints, keep-last-k, resume state and the plain model files (one process)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from mlps_dist.config import TrainConfig
from mlps_dist.data import batching
from mlps_dist.train import parallel
from mlps_dist.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_model_file,
    rng_state,
    save_model_file,
    set_rng_state,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def param_groups(self):
        return {"backbone": list(self.body.parameters()), "head": list(self.head.parameters())}


META = {"name": "net", "num_classes": 2, "parallel": "ddp"}


def make_model(seed: int = 0) -> parallel.Wrapped:
    torch.manual_seed(seed)
    cfg = TrainConfig(batch_size=4, lr=0.1)
    return parallel.wrap(Net(), cfg, plan=batching.plan_batches(cfg, 1), total_steps=10, device=torch.device("cpu"))


def train_one_step(model: parallel.Wrapped, x: torch.Tensor | None = None) -> None:
    x = torch.randn(4, 4) if x is None else x
    with model.sync_gradients(True):
        model.backward(model(x).pow(2).mean(), True)
    model.step()


def client(step: int) -> dict:
    return {
        "progress": {"epoch": 0, "step_in_epoch": step, "global_step": step, "best_score": 0.0},
        "task": {},
        "config": {},
        "meta": META,
    }


def test_keep_last_k_and_latest_marker(tmp_path):
    model, ckpts = make_model(), Checkpointer(tmp_path / "ck", keep_last=2)
    for step in (1, 2, 3, 4):
        train_one_step(model)
        ckpts.save(step, model, client(step))
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["latest", "step-00000003", "step-00000004"]
    assert ckpts.latest().name == "step-00000004"


def test_resume_restores_weights_optimizer_schedule_and_rng(tmp_path):
    x1, x2 = torch.randn(4, 4), torch.randn(4, 4)
    model, ckpts = make_model(), Checkpointer(tmp_path / "ck")
    train_one_step(model, x1)
    ckpts.save(1, model, client(1))
    expected_draw = torch.rand(3)  # what the RNG yields right after the checkpoint
    train_one_step(model, x2)  # momentum and the poly LR of step 2 both matter here

    resumed = make_model(seed=99)
    state = ckpts.load(ckpts.latest(), resumed, META)
    assert state["progress"]["global_step"] == 1 and state["meta"] == META
    assert torch.equal(torch.rand(3), expected_draw)
    train_one_step(resumed, x2)
    for key, value in model.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key
    assert resumed.lr() == model.lr() < 0.1


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    model, ckpts = make_model(), Checkpointer(tmp_path / "ck")
    ckpts.save(5, model, client(5))
    # A crash mid-save leaves a partial .tmp folder and no new marker.
    partial = tmp_path / "ck" / "step-00000006.tmp"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"\x00half")
    assert ckpts.latest().name == "step-00000005"
    assert ckpts.load(ckpts.latest(), make_model(), META)["progress"]["global_step"] == 5
    ckpts.save(6, model, client(6))  # the next save replaces the leftover
    assert ckpts.latest().name == "step-00000006"
    assert not partial.exists()


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    model, ckpts = make_model(), Checkpointer(tmp_path / "ck")
    path = ckpts.save(1, model, client(1))
    with pytest.raises(CheckpointError, match="num_classes=2.*num_classes=5"):
        ckpts.check(path, {**META, "num_classes": 5})
    with pytest.raises(CheckpointError, match="parallel='ddp'.*parallel='deepspeed'"):
        ckpts.check(path, {**META, "parallel": "deepspeed"})
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.pt cannot be read"):
        ckpts.load(path, make_model(), META)
    (tmp_path / "ck" / "latest").write_text("step-00000042")  # names a folder that is gone
    assert ckpts.latest() == path  # the newest complete checkpoint instead


def test_rng_state_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = rng_state()
    first = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(8), np.random.seed(8), random.seed(8)
    set_rng_state(state)
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_model_file_round_trip_and_errors(tmp_path):
    model = make_model()
    meta = {"name": "net", "num_classes": 2, "classes": ["a", "b"], "config": {"seed": 0, "lr": [0.1]}}
    save_model_file(tmp_path / "model.pt", model.module.state_dict(), meta)
    state, got = load_model_file(tmp_path / "model.pt")
    assert got == meta
    for k, v in model.module.state_dict().items():
        assert torch.equal(state[k], v)
    assert not (tmp_path / "model.pt.tmp").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_file(tmp_path / "missing.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks 'state_dict'/'meta'"):
        load_model_file(tmp_path / "other.pt")
