"""One small API over DistributedDataParallel and a DeepSpeed engine.

    plan = plan_batches(train_cfg, world)             # batching.py: micro batches + accumulation
    model = wrap(module, train_cfg, plan=plan, total_steps=N, device=dev)
    for micro, batch in enumerate(micro_batches):
        boundary = micro == plan.accumulation - 1
        with model.sync_gradients(boundary):          # DDP: no all-reduce until the boundary
            with model.autocast():
                loss = criterion(model(batch["image"]), batch["labels"])
            model.backward(loss * plan.loss_weight(micro, rank), boundary)
    model.step()                                      # optimizer + poly LR, then zero_grad
    model.module                                      # the bare nn.Module (for saving)

Both back ends use our own torch SGD and our own poly LR schedule (a LambdaLR, one
step per optimizer step); DeepSpeed receives them as client optimizer/scheduler and its
batch sizes are filled in from our config, so the JSON cannot disagree with it.
Checkpoint I/O of the training state lives in ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch
import torch.nn as nn

from mlps_dist import dist
from mlps_dist.config import ConfigError, TrainConfig
from mlps_dist.data.batching import BatchPlan, even_world_sizes
from mlps_dist.models.batchnorm import sync_batchnorm_helps
from mlps_dist.train import gpu_options, precision

# DDP's switch for the buffer broadcast before every forward (renamed in torch 2.13).
FORWARD_SYNC_KEY = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else "broadcast_buffers"
)

# Keys of a DeepSpeed JSON that our config owns; the JSON must leave them out.
_OWNED_DS_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    *precision.DEEPSPEED_KEYS,
)


def resolve_precision(train_cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32 (mlps_dist/train/precision.py)."""
    return precision.resolve(train_cfg, device)


def optimizer_groups(groups: dict[str, list[nn.Parameter]], train_cfg: TrainConfig) -> list[dict]:
    """The model's {"backbone", "head"} parameters split into weights (ndim > 1) and biases
    (ndim <= 1: conv/linear biases and, when trained, norm affine parameters), each with its
    LR multiplier and weight decay:

        backbone.weight  1x                          weight decay
        backbone.bias    bias_lr_mult                weight decay only if bias_weight_decay
        head.weight      head_lr_mult                weight decay
        head.bias        head_lr_mult x bias_lr_mult weight decay only if bias_weight_decay

    The public stage 1 uses 1x/2x/10x/20x with no decay on biases (the classifier's
    defaults); the segmenter defaults keep 1x/10x with decay on everything, as the public
    DeepLab training does. Empty groups are left out."""
    out = []
    for part, params in (("backbone", groups["backbone"]), ("head", groups["head"])):
        part_mult = train_cfg.head_lr_mult if part == "head" else 1.0
        weights = [p for p in params if p.ndim > 1]
        biases = [p for p in params if p.ndim <= 1]
        bias_decay = train_cfg.weight_decay if train_cfg.bias_weight_decay else 0.0
        for kind, members, mult, decay in (
            ("weight", weights, part_mult, train_cfg.weight_decay),
            ("bias", biases, part_mult * train_cfg.bias_lr_mult, bias_decay),
        ):
            if members:
                out.append(
                    {
                        "params": members,
                        "name": f"{part}.{kind}",
                        "lr_mult": mult,
                        "lr": train_cfg.lr * mult,
                        "weight_decay": decay,
                    }
                )
    return out


def create_optimizer(groups: dict[str, list[nn.Parameter]], train_cfg: TrainConfig) -> torch.optim.Optimizer:
    if train_cfg.optimizer == "adamw":
        # Models trained from scratch in a few hundred steps (the CPU miniatures) get much
        # further per step with Adam's per-parameter scaling; groups and schedule as for SGD.
        return torch.optim.AdamW(
            optimizer_groups(groups, train_cfg),
            lr=train_cfg.lr,
            betas=(train_cfg.momentum, 0.999),
            weight_decay=train_cfg.weight_decay,
        )
    # The public MLPS code calls SGD(params, lr, weight_decay) positionally, which puts the
    # weight decay (5e-4) into the momentum slot; we pass real momentum by keyword.
    return torch.optim.SGD(
        optimizer_groups(groups, train_cfg),
        lr=train_cfg.lr,
        momentum=train_cfg.momentum,
        weight_decay=train_cfg.weight_decay,
    )


def create_poly_schedule(optimizer, total_steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base_lr x (1 - step/total)^power, stepped once per optimizer step."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(1.0 - step / total, 0.0) ** power)


class Wrapped:
    """What the engine talks to; ``DdpModel`` and ``DeepSpeedModel`` implement it."""

    kind = ""
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def __call__(self, *args, **kwargs):
        return self.forward_module(*args, **kwargs)

    def autocast(self):
        """Autocast around forward and loss (DDP); DeepSpeed runs its own (see precision.py)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def precision_record(self, train_cfg: TrainConfig) -> dict:
        return precision.record(self.kind, train_cfg, self.amp_dtype, self.device)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def set_lr_scale(self, scale: float) -> None:
        """Every group's LR = its configured LR x ``scale`` from now on, at the schedule's
        current position (the training guard's remedy after a rollback). Collective-free:
        every rank applies the same scale."""
        sched = self.scheduler
        for i, group in enumerate(sched.optimizer.param_groups):
            sched.base_lrs[i] = group["initial_lr"] * scale
            group["lr"] = sched.base_lrs[i] * sched.lr_lambdas[i](sched.last_epoch)

    def sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP only
        broadcasts them at the start of a forward, so after the last step of an epoch each
        rank holds its own; validation and saved models must all see rank 0's."""
        if dist.get_world_size() > 1:
            for buffer in self.module.buffers():
                torch.distributed.broadcast(buffer, src=0)


class DdpModel(Wrapped):
    kind = "ddp"

    def __init__(
        self, module: nn.Module, train_cfg: TrainConfig, plan: BatchPlan, total_steps: int, device: torch.device
    ):
        self.module = module
        self.plan = plan
        self.device = device
        self.grad_clip = train_cfg.grad_clip
        self.amp_dtype = resolve_precision(train_cfg, device)
        self.optimizer = create_optimizer(module.param_groups(), train_cfg)
        self.scheduler = create_poly_schedule(self.optimizer, total_steps, train_cfg.poly_power)
        # Loss scaling is needed for fp16 only; a disabled scaler is a transparent no-op.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            # broadcast_buffers=False: no broadcast of every BatchNorm buffer before each forward.
            # Training-mode BN normalises with the batch's statistics (SyncBatchNorm's on several
            # GPUs), frozen BN's buffers never change, and sync_buffers() gives every rank rank 0's
            # statistics at each epoch end, before validation and saving; rank 0's own buffers,
            # which checkpoints hold, are the same either way.
            # torch >= 2.13 names it forward_sync_buffers (which still syncs once at wrapping, when
            # every rank holds the same buffers anyway) and warns on the old name.
            no_sync = {FORWARD_SYNC_KEY: False}
            self.forward_module = nn.parallel.DistributedDataParallel(module, device_ids=ids, **no_sync)
        else:
            self.forward_module = module

    def sync_gradients(self, boundary: bool):
        ddp = self.forward_module
        if boundary or not isinstance(ddp, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """``loss`` comes weighted by ``plan.loss_weight`` (1/accumulation when even)."""
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def deepspeed_config(train_cfg: TrainConfig, plan: BatchPlan, amp_dtype) -> dict:
    """The JSON of ``train_cfg.deepspeed_config`` completed from our config (ConfigError if it
    cannot be read or sets a key that our config owns)."""
    path = train_cfg.deepspeed_config
    try:
        ds_cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed_config {path}: cannot read it as JSON ({exc})") from exc
    clash = [k for k in _OWNED_DS_KEYS if k in ds_cfg]
    if clash:
        raise ConfigError(
            f"{path}: remove {clash}; batch sizes, optimizer, schedule, clipping and "
            "precision come from the trainer section of the experiment config"
        )
    stage = (ds_cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage == 3:
        # ZeRO-3 partitions the weights themselves: module.state_dict() on a rank holds empty
        # placeholders, so model files, validation and the mask pass would see no weights.
        raise ConfigError(
            f"{path}: ZeRO stage 3 is not supported (model files would hold partitioned, "
            "empty weights); use configs/deepspeed/zero2.json (optimizer states and gradients "
            "partitioned) or zero1.json"
        )
    if not plan.even:
        raise ConfigError(
            f"DeepSpeed needs equal micro batches on every rank, but {plan.describe()} on {plan.world} ranks; "
            f"with batch_size={train_cfg.batch_size} and micro_batch_size={train_cfg.micro_batch_size} it runs on "
            f"{', '.join(map(str, even_world_sizes(train_cfg, 32)))} ranks; use parallel=ddp (uneven micro "
            "batches, same gradient), another world size, or a batch_size that the ranks divide"
        )
    ds_cfg.update(
        train_batch_size=plan.global_batch,
        train_micro_batch_size_per_gpu=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        gradient_clipping=train_cfg.grad_clip,
        zero_allow_untested_optimizer=True,  # our torch SGD is the client optimizer
        **precision.deepspeed_sections(amp_dtype),
    )
    return ds_cfg


class DeepSpeedModel(Wrapped):
    kind = "deepspeed"

    def __init__(
        self, module: nn.Module, train_cfg: TrainConfig, plan: BatchPlan, total_steps: int, device: torch.device
    ):
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (~40 s)
            # that only its inference all-reduce uses; gloo does the training collectives.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # The process group already exists (mlps_dist.dist.init): DeepSpeed adopts it.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
        self.module = module
        self.plan = plan
        self.device = device
        # bf16: DeepSpeed's torch_autocast section (fp32 weights, autocast inside its forward);
        # fp16 is refused before this point (precision.check).
        self.amp_dtype = resolve_precision(train_cfg, device)
        optimizer = create_optimizer(module.param_groups(), train_cfg)
        scheduler = create_poly_schedule(optimizer, total_steps, train_cfg.poly_power)
        ds_cfg = deepspeed_config(train_cfg, plan, self.amp_dtype)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False
        )
        precision.check_engine(self.engine, self.amp_dtype)
        self.forward_module = self.engine

    def autocast(self):
        # DeepSpeed autocasts inside its forward from the JSON's torch_autocast section, and
        # switches an outer CUDA autocast off there; the loss outside it is computed in fp32.
        return contextlib.nullcontext()
        self.zero_stage = self.engine.zero_optimization_stage()

    def sync_gradients(self, boundary: bool):
        # DeepSpeed reduces gradients only at the accumulation boundary we announce.
        self.engine.set_gradient_accumulation_boundary(boundary)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # DeepSpeed divides by the accumulation steps itself; the plan's weight already does.
        self.engine.backward(loss * self.plan.accumulation)
        if not boundary:
            self.engine.step()  # counts the micro step; the update happens at the boundary

    def step(self) -> None:
        self.engine.step()  # optimizer, client LR schedule, zero_grad

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


def wrap(
    module: nn.Module,
    train_cfg: TrainConfig,
    *,
    plan: BatchPlan,
    total_steps: int,
    device: torch.device,
    channels_last: bool = False,
) -> Wrapped:
    """Move ``module`` to ``device`` and wrap it for ``train_cfg.parallel`` (ddp | deepspeed);
    ``channels_last`` (gpu.channels_last): NHWC weights and inputs (gpu_options.py)."""
    module = module.to(device)
    if channels_last:
        module = gpu_options.channels_last(module)
    if sync_batchnorm_helps(module, dist.get_world_size(), device):
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # only CUDA modules can run it
    if train_cfg.parallel == "deepspeed":
        return DeepSpeedModel(module, train_cfg, plan, total_steps, device)
    return DdpModel(module, train_cfg, plan, total_steps, device)
