"""The training loop shared by the classifier (stage 1) and the segmenter (stage 3).

    result = fit(cfg, cfg.classifier, task, log)

``task`` supplies what differs between the stages (see ``TrainTask``); the loop owns the
rest: batch plan and gradient accumulation, DDP/DeepSpeed, poly LR, seeding, periodic and
epoch-end checkpoints, automatic resume, best/final model files and preemption. The
resumed run continues from the exact data position, so a crash at any moment followed by a
rerun takes the same steps over the same samples as no crash: on the CPU to the same
weights bit for bit, on CUDA within rounding (cuDNN and atomic adds are not reproducible;
docs/running.md, "What a resume reproduces"). With ``ema_decay`` > 0, validation, best.pt and
model.pt use an exponential moving average of the weights (ema.py), kept in the checkpoints.

Preemption (preemption.py): SIGUSR1 or SIGTERM sets a flag; after the current optimizer
step all ranks agree on it, write a checkpoint and raise ``core.errors.Preempted``; the
stage exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "rerun to resume").

The stage around the loop (parse, lock, log, stamp) is mlps_dist/stages/session.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from mlps_dist import dist
from mlps_dist.config import Config, ConfigError, TrainConfig
from mlps_dist.core import layout
from mlps_dist.core.errors import Preempted
from mlps_dist.data import batching
from mlps_dist.run import artifacts
from mlps_dist.run.runlog import RunLog
from mlps_dist.train import gpu_options, parallel, precision
from mlps_dist.train import guard as health_guard
from mlps_dist.train.checkpoint import Checkpointer, save_model_file
from mlps_dist.train.ema import WeightAverage
from mlps_dist.train.preemption import PreemptionGuard
from mlps_dist.train.speed import EpochMeter
from mlps_dist.train.speed import describe as describe_speed


class TrainTask(Protocol):
    stage: str  # run-dir folder and log name: "classifier" | "segmenter"
    meta: dict  # name, num_classes, classes, config: stored with checkpoints and model files

    def build_model(self) -> nn.Module: ...  # has .param_groups() -> {"backbone", "head"} (parallel.optimizer_groups)
    def micro_steps_per_epoch(self, plan: batching.BatchPlan) -> int: ...
    def train_loader(self, epoch: int, start_step: int, plan: batching.BatchPlan) -> Iterable[dict]: ...
    def loss(self, model, batch: dict) -> torch.Tensor: ...  # model(x) runs the wrapped forward
    def start_epoch(self, epoch: int, module: nn.Module) -> dict[str, float]: ...  # scalars to log
    def validate(self, module: nn.Module, epoch: int) -> dict[str, float]: ...  # holds "score"
    def visualise(self, module: nn.Module, epoch: int, log: RunLog) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    epoch: int = 0  # epoch in progress (== epochs when training is done)
    step_in_epoch: int = 0  # optimizer steps done in this epoch: the data position
    global_step: int = 0
    best_score: float = -math.inf


def expected_meta(task: TrainTask, train_cfg: TrainConfig) -> dict:
    """What a checkpoint must have been written for to be resumed by this run."""
    return {"name": task.meta["name"], "num_classes": task.meta["num_classes"], "parallel": train_cfg.parallel}


def preflight(cfg: Config, train_cfg: TrainConfig, task: TrainTask) -> int:
    """Every check of the training setup that can fail, before any model is built: the batch
    plan for this world size, the DeepSpeed JSON, a split too small for one step, and a
    checkpoint in the run dir that cannot be resumed (unreadable, or written for another
    model / class count / parallel mode). Returns the optimizer steps per epoch."""
    plan = batching.plan_batches(train_cfg, dist.get_world_size(), task.stage)
    precision.check(train_cfg, task.stage, dist.device())
    if train_cfg.parallel == "deepspeed":
        parallel.deepspeed_config(train_cfg, plan, amp_dtype=precision.resolve(train_cfg, dist.device()))
    steps_per_epoch = task.micro_steps_per_epoch(plan) // plan.accumulation
    if steps_per_epoch < 1:
        raise ConfigError(
            f"'{task.stage}.batch_size' = {plan.global_batch} is larger than the training split; "
            "lower it or add training data"
        )
    check_resumable(cfg, train_cfg, task)
    return steps_per_epoch


def check_resumable(cfg: Config, train_cfg: TrainConfig, task: TrainTask) -> None:
    """CheckpointError if the run dir holds a checkpoint this run cannot resume."""
    ckpts = Checkpointer(layout.checkpoints_dir(cfg.run_dir, task.stage), train_cfg.keep_last)
    latest = ckpts.latest()
    if latest is not None:
        state = ckpts.check(latest, expected_meta(task, train_cfg))
        artifacts.check_same_inputs(cfg, task.stage, state, latest)


def derive_seed(seed: int, rank: int) -> int:
    """Distinct, reproducible per-rank seeds from the experiment seed."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_step(model: parallel.Wrapped, task: TrainTask, batches, plan: batching.BatchPlan) -> torch.Tensor:
    """One optimizer step over ``plan.accumulation`` micro batches. Each micro batch's mean
    loss is weighted by its share of the global batch (batching.py), so the all-reduced
    gradient is that of the whole global batch even when micro batches are uneven. Returns
    this rank's weighted loss as a tensor (averaged over ranks it is the global batch's
    mean loss); reading it waits for the device, so the loop does that at log steps only."""
    total = None
    rank = dist.get_rank()
    for micro in range(plan.accumulation):
        # Loaders may draw from the global RNG (a DataLoader draws its worker seed on the first
        # batch); fork it so that the model's random stream (dropout) depends only on the
        # steps taken, and a resumed run draws exactly what an uninterrupted one draws.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        boundary = micro == plan.accumulation - 1
        with model.sync_gradients(boundary):
            with model.autocast():
                loss = task.loss(model, batch) * plan.loss_weight(micro, rank)
            model.backward(loss, boundary)
        total = loss.detach().double() if total is None else total + loss.detach().double()
    model.step()
    return total


def _mean_over_ranks(value) -> float:
    value = torch.as_tensor(value, dtype=torch.float64).reshape(1)
    return float(dist.all_reduce_sum(value.cpu()).item()) / dist.get_world_size()


def fit(cfg: Config, train_cfg: TrainConfig, task: TrainTask, log: RunLog) -> Progress:
    """Train ``task`` to the end (resuming from the run dir's checkpoint if there is one).
    After a rollback of the training guard (mlps_dist/train/guard.py) the run resumes from the
    good checkpoint with the recorded remedy, exactly as a relaunch would."""
    while True:
        try:
            return _fit_once(cfg, train_cfg, task, log)
        except health_guard.RolledBack:
            continue


def _fit_once(cfg: Config, train_cfg: TrainConfig, task: TrainTask, log: RunLog) -> Progress:
    steps_per_epoch = preflight(cfg, train_cfg, task)
    plan = batching.plan_batches(train_cfg, dist.get_world_size(), task.stage)
    # Installed first: a signal while the model builds or a checkpoint loads is honoured too.
    with PreemptionGuard() as guard:
        speed = gpu_options.apply(cfg.gpu, dist.device())
        seed_everything(cfg.seed)  # same initial weights on every rank
        model = parallel.wrap(
            task.build_model(),
            train_cfg,
            plan=plan,
            device=dist.device(),
            total_steps=steps_per_epoch * train_cfg.epochs,
            channels_last=cfg.gpu.channels_last,
        )
        seed_everything(derive_seed(cfg.seed, dist.get_rank()))
        average = WeightAverage(model.module, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
        evaluated = average.module if average is not None else model.module  # validated and saved
        ran = model.precision_record(train_cfg)  # what runs, recorded in log.jsonl and the model files
        log.info(f"{model.kind}: {plan.describe()}; {steps_per_epoch} steps/epoch; {ran['ran']}")
        log.event("precision", **ran)
        log.event("speed_options", **speed)
        task.meta = {**task.meta, "precision": ran}
        ckpts = Checkpointer(layout.checkpoints_dir(cfg.run_dir, task.stage), train_cfg.keep_last)
        expect = expected_meta(task, train_cfg)
        inputs = artifacts.checkpoint_inputs(cfg, task.stage)
        progress = Progress()
        health = health_guard.TrainingHealth(
            train_cfg.guard,
            task.stage,
            layout.health_file(cfg.run_dir, task.stage),
            ckpts,
            log,
            hint=getattr(task, "failure_hint", None),
        )
        resume_from = ckpts.latest()
        if resume_from is not None:
            state = ckpts.load(resume_from, model, expect)
            progress = Progress(**state["progress"])
            task.load_state_dict(state["task"])
            health.load_state_dict(state.get("health"))
            if average is not None:
                average.load_state_dict(state["ema"])
            log.info(f"resumed from {resume_from} (epoch {progress.epoch}, step {progress.step_in_epoch})")
            log.event("resume", checkpoint=str(resume_from), **asdict(progress))
        model.set_lr_scale(health.lr_scale)  # 1 unless the guard rolled back

        def save() -> Path:
            client = {
                "progress": asdict(progress),
                "task": task.state_dict(),
                "config": cfg.to_dict(),
                "meta": expect,
                "inputs": inputs,
                "health": health.state_dict(),
            }
            if average is not None:
                client["ema"] = average.state_dict()
            path = ckpts.save(progress.global_step, model, client)
            log.event("checkpoint", path=str(path), **asdict(progress))
            return path

        meter = EpochMeter(dist.device())
        for epoch in range(progress.epoch, train_cfg.epochs):
            scalars = task.start_epoch(epoch, model.module)
            log.scalars(scalars, step=progress.global_step, prefix="train/")
            model.train()
            loader = task.train_loader(epoch, progress.step_in_epoch * plan.accumulation, plan)
            with torch.random.fork_rng(devices=[]):  # see train_step
                batches = iter(loader)
            first_step = progress.step_in_epoch
            bar = log.progress(
                range(progress.step_in_epoch, steps_per_epoch),
                total=steps_per_epoch,
                initial=progress.step_in_epoch,
                desc=f"epoch {epoch}",
            )
            meter.start()
            for _ in bar:
                loss = train_step(model, task, batches, plan)
                if average is not None:
                    average.update(model.module)
                progress.step_in_epoch += 1
                progress.global_step += 1
                health.add_step_loss(loss)
                if progress.global_step % max(train_cfg.log_every_steps, 1) == 0:
                    log.scalars({"loss": _mean_over_ranks(loss), "lr": model.lr()}, progress.global_step, "train/")
                    health.check_losses(epoch, progress.global_step)
                mid_epoch = progress.step_in_epoch < steps_per_epoch  # the epoch end saves anyway
                if mid_epoch and guard.poll():
                    save()
                    log.event("preempted", **asdict(progress))
                    raise Preempted(f"preempted at epoch {epoch} step {progress.step_in_epoch}; rerun to resume")
                if mid_epoch and train_cfg.ckpt_every_steps and progress.global_step % train_cfg.ckpt_every_steps == 0:
                    save()
            speed_figures = meter.done(progress.step_in_epoch - first_step, plan.global_batch)
            log.scalars(speed_figures, step=progress.global_step, prefix="speed/")
            log.info(f"epoch {epoch}: {progress.step_in_epoch - first_step} steps, {describe_speed(speed_figures)}")
            del batches, loader
            model.sync_buffers()
            if average is not None:
                average.sync()
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            last = epoch + 1 == train_cfg.epochs
            health.check_losses(epoch, progress.global_step)
            if last or (epoch + 1) % max(train_cfg.val_every_epochs, 1) == 0:
                _validate(
                    evaluated, task, epoch, progress, log, layout.model_file(cfg.run_dir, task.stage, "best"), health
                )
            health.mark_good(save())
            if guard.agreed():
                log.event("preempted", **asdict(progress))
                raise Preempted(f"preempted after epoch {epoch}; rerun to resume")
    final_meta = {
        **task.meta,
        "epoch": health.last_epoch,
        "metrics": health.last_metrics,
        "health": health.check_final(health.last_epoch),
    }  # never hands on a collapsed model
    if dist.is_main():
        save_model_file(layout.model_file(cfg.run_dir, task.stage), evaluated.state_dict(), final_meta)
    dist.barrier()
    log.info(f"wrote {layout.model_file(cfg.run_dir, task.stage)}")
    return progress


def _validate(
    module: nn.Module,
    task: TrainTask,
    epoch: int,
    progress: Progress,
    log: RunLog,
    best_path: Path,
    health: health_guard.TrainingHealth,
) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        metrics = task.validate(module, epoch)
        task.visualise(module, epoch, log)
    log.scalars(metrics, step=progress.global_step, prefix="val/")
    log.info(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    health.check_validation(metrics, epoch, progress.global_step)  # a collapsed epoch never becomes best.pt
    score = metrics["score"]
    if not math.isnan(score) and score > progress.best_score:
        progress.best_score = float(score)
        if dist.is_main():
            save_model_file(
                best_path,
                module.state_dict(),
                {**task.meta, "epoch": epoch, "metrics": metrics, "health": health.model_meta()},
            )
        log.event("best", epoch=epoch, score=score)
    dist.barrier()
    return metrics
