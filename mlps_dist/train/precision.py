"""Training precision: ``<stage>.precision`` is the one setting for both back ends.

    dtype = resolve(train_cfg, device)            # None (fp32) | torch.bfloat16 | torch.float16
    check(train_cfg, stage, device)               # ConfigError for what cannot work, one line
    ds_cfg.update(deepspeed_sections(dtype))      # DeepSpeed's fp16/bf16/torch_autocast, from ours
    record(wrapped, train_cfg, device)            # what ran: logged, and kept in the model files

How each combination runs:

- ``ddp`` + bf16/fp16: ``torch.autocast`` on the rank's device around forward and loss, fp32
  weights; fp16 adds a ``GradScaler``. bf16 also runs on the CPU (CPU autocast handles
  BatchNorm with fp32 statistics), fp16 needs CUDA.
- ``deepspeed`` + bf16: DeepSpeed's ``torch_autocast`` section, written here (fp32 weights,
  bf16 compute in its forward, gradients reduced in fp32: no module is listed as
  lower-precision safe). DeepSpeed switches an outer autocast *off* inside its forward unless
  that section is enabled, so the project never wraps a DeepSpeed forward itself. DeepSpeed's
  own ``bf16``/``fp16`` sections are always written disabled: they cast the parameters to half
  but leave BatchNorm's running statistics in fp32, which fails at the first BatchNorm
  ("expected scalar type BFloat16 but found Float", on CPU and GPU alike).
- ``deepspeed`` + fp16 is refused: DeepSpeed's fp16 mode fails as above, and its autocast
  loss scaler for ZeRO is not covered by any test here. bf16 or ``parallel=ddp`` instead.
"""

from __future__ import annotations

import torch

from mlps_dist.config import ConfigError, TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The DeepSpeed JSON keys the precision setting owns (the JSON file must leave them out).
DEEPSPEED_KEYS = ("fp16", "bf16", "torch_autocast")


def resolve(train_cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train_cfg.precision`` on ``device``, None for fp32."""
    return DTYPES.get(train_cfg.precision)


def check(train_cfg: TrainConfig, stage: str, device: torch.device) -> None:
    """ConfigError (one line naming the keys) for a precision that cannot run here."""
    if train_cfg.precision == "fp16" and train_cfg.parallel == "deepspeed":
        raise ConfigError(
            f"'{stage}.precision' = fp16 with '{stage}.parallel' = deepspeed is not supported "
            f"(DeepSpeed's fp16 mode fails on BatchNorm); use {stage}.precision=bf16 or "
            f"{stage}.parallel=ddp"
        )
    if train_cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"'{stage}.precision' = fp16 needs CUDA (loss scaling on {device} is not supported); "
            f"use {stage}.precision=bf16 or fp32 on the CPU"
        )


def deepspeed_sections(dtype: torch.dtype | None) -> dict:
    """DeepSpeed's precision sections for the autocast ``dtype`` (None: fp32)."""
    autocast = {"enabled": dtype is not None}
    if dtype is not None:
        autocast.update(
            dtype="bfloat16" if dtype == torch.bfloat16 else "float16", lower_precision_safe_modules=[]
        )  # gradients all-reduced in fp32, as DDP does
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}, "torch_autocast": autocast}


def check_engine(engine, dtype: torch.dtype | None) -> None:
    """ConfigError when the DeepSpeed engine does not run the autocast it was configured for
    (a DeepSpeed release without the ``torch_autocast`` section would silently run fp32)."""
    enabled = getattr(engine, "torch_autocast_enabled", None)
    if dtype is None:
        return
    if enabled is None or not enabled() or engine.torch_autocast_dtype() != dtype:
        import deepspeed

        raise ConfigError(
            f"deepspeed {deepspeed.__version__} does not run the 'torch_autocast' section this "
            "precision needs; install deepspeed>=0.17 or set the stage's precision=fp32"
        )


def describe(kind: str, dtype: torch.dtype | None, device: torch.device) -> str:
    """What ran, in words: 'fp32 on cpu', 'bf16 autocast (deepspeed torch_autocast) on cuda:0'."""
    if dtype is None:
        return f"fp32 on {device}"
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    how = (
        "deepspeed torch_autocast"
        if kind == "deepspeed"
        else "torch.autocast" + (" + GradScaler" if dtype == torch.float16 else "")
    )
    return f"{name} autocast ({how}) on {device}"


def record(kind: str, train_cfg: TrainConfig, dtype: torch.dtype | None, device: torch.device) -> dict:
    """The record of what ran, for RUN/log.jsonl and the model files' metadata."""
    return {
        "asked": train_cfg.precision,
        "parallel": kind,
        "device": str(device),
        "autocast": str(dtype).replace("torch.", "") if dtype is not None else None,
        "ran": describe(kind, dtype, device),
    }
