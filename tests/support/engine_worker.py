"""Runs the training engine under torchrun for the tests and dumps every rank's weights.

    torchrun --standalone --nproc_per_node=2 tests/support/engine_worker.py OUT --config CFG [key=value ...]

``--task regression`` (default) trains a small MLP on a fixed regression problem through the
real engine, checkpointing and DDP/DeepSpeed; ``--task classifier`` trains the stage-1 task.
Each rank writes OUT/pid-rank<R> at start and OUT/weights-rank<R>.pt at the end; the exit
status follows the entry points (75 = preempted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlps_dist import dist
from mlps_dist.config import load_config
from mlps_dist.core.errors import EXIT_PREEMPTED, MlpsError, Preempted
from mlps_dist.data.batching import rank_micro_batches
from mlps_dist.run.runlog import RunLog
from mlps_dist.train import engine

SAMPLES, FEATURES = 64, 6


class SmallMlp(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 1, bias=False)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(1)

    def param_groups(self):
        return {"backbone": list(self.body.parameters()), "head": list(self.head.parameters())}


class RegressionTask:
    """y = sin(x . w): the order of epoch e is a permutation drawn from (seed, e) only, and
    rank r / micro step m of a global step take the plan's slices of it, as the real loaders do."""

    stage = "regression"

    def __init__(self, cfg, dropout: float, step_seconds: float):
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, FEATURES, generator=gen)
        self.y = torch.sin(self.x @ torch.randn(FEATURES, generator=gen))
        self.cfg, self.dropout, self.step_seconds = cfg, dropout, step_seconds
        self.meta = {"name": "small_mlp", "num_classes": 1, "classes": ["y"], "config": cfg.to_dict()}
        self.epochs_started: list[int] = []
        self.trained = None

    def build_model(self):
        return SmallMlp(self.dropout)

    def micro_steps_per_epoch(self, plan):
        return plan.micro_steps_per_epoch(SAMPLES)

    def train_loader(self, epoch, start_step, plan):
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(SAMPLES)
        device = dist.device()  # a GPU when the job has one (tests/system/test_gpu.py)
        for idx in rank_micro_batches(order, plan, dist.get_rank(), start_step):  # uneven where it must be
            yield {"x": self.x[idx].to(device), "y": self.y[idx].to(device)}

    def loss(self, model, batch):
        time.sleep(self.step_seconds)
        out = model(batch["x"])
        self.forward_dtype = str(out.dtype)  # bf16 under autocast (tests/multiprocess/test_precision.py)
        return F.mse_loss(out.float(), batch["y"])

    def start_epoch(self, epoch, module):
        self.epochs_started.append(epoch)
        return {"epoch": float(epoch)}

    def validate(self, module, epoch):
        self.trained = module
        device = dist.device()
        return {"score": -float(F.mse_loss(module(self.x.to(device)), self.y.to(device)))}

    def visualise(self, module, epoch, log):
        pass

    def state_dict(self):
        return {"epochs_started": list(self.epochs_started)}

    def load_state_dict(self, state):
        self.epochs_started = list(state["epochs_started"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--config", required=True)
    parser.add_argument("--task", default="regression")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "classifier":
        from mlps_dist.stages import train_classifier

        train_cfg, prepare = cfg.classifier, train_classifier.prepare
    else:
        train_cfg, prepare = cfg.segmenter, lambda c: RegressionTask(c, args.dropout, args.step_seconds)
    dist.init(cfg.dist.backend, force_group=train_cfg.parallel == "deepspeed")
    (out / f"pid-rank{dist.get_rank()}").write_text(str(os.getpid()))
    log = RunLog(cfg.run_dir, args.task, tensorboard=False)
    try:
        task = prepare(cfg)
        if args.task == "classifier":  # validate() sees the module only on the last epoch here
            original = task.validate
            task.validate = lambda module, epoch: (setattr(task, "trained", module), original(module, epoch))[1]
            if args.step_seconds:  # slow steps, so that a test can stop the job between checkpoints
                loss = task.loss
                task.loss = lambda model, batch: (time.sleep(args.step_seconds), loss(model, batch))[1]
        engine.fit(cfg, train_cfg, task, log)
        state = {k: v.detach().cpu().clone() for k, v in task.trained.state_dict().items()}
        dali = sys.modules.get("mlps_dist.data.dali_loader")  # imported only where data.loader=dali
        torch.save(
            {
                "weights": state,
                "task": task.state_dict(),
                "forward_dtype": getattr(task, "forward_dtype", ""),
                "dali_pipelines_built": dali.pipelines_built() if dali else 0,
            },
            out / f"weights-rank{dist.get_rank()}.pt",
        )
        return 0
    except Preempted:
        return EXIT_PREEMPTED
    except MlpsError as exc:  # e.g. guard.TrainingFailed: one message, exit status 2
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        log.close()
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
