"""BatchNorm helpers that hold for plain and synchronised BatchNorm alike.

``nn.SyncBatchNorm`` is not a subclass of ``nn.BatchNorm2d`` (both derive from
``_BatchNorm``): code that looks for ``BatchNorm2d`` misses every layer after
``convert_sync_batchnorm``. Frozen layers (eval mode, fixed affine) compute nothing across
ranks, so converting a model whose BatchNorm is all frozen buys nothing but a collective
per layer; ``sync_batchnorm_helps`` says when it is worth it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze_batchnorm_affine(module: nn.Module) -> None:
    """Fixed scale and shift: no gradients for any BatchNorm weight or bias."""
    for m in batchnorm_layers(module):
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(False)


def keep_batchnorm_in_eval(module: nn.Module) -> None:
    """Running statistics used, never updated (call after ``module.train()``)."""
    for m in batchnorm_layers(module):
        m.eval()


def batchnorm_trains(module: nn.Module) -> bool:
    """Whether any BatchNorm layer normalises with batch statistics in training mode.
    Asks the module itself (its ``train()`` applies any freezing) and restores its modes."""
    layers = batchnorm_layers(module)
    if not layers:
        return False
    modes = {m: m.training for m in module.modules()}
    try:
        module.train()
        return any(m.training for m in layers)
    finally:
        for m, mode in modes.items():
            m.training = mode


def sync_batchnorm_helps(module: nn.Module, world: int, device: torch.device) -> bool:
    """SyncBatchNorm only where batch statistics are computed (some layer trains), there is
    more than one rank to share them with, and the device can run it (CUDA only)."""
    return torch.device(device).type == "cuda" and world > 1 and batchnorm_trains(module)
