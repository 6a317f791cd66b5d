"""An exponential moving average of a model's weights, for validation and the model files.

    average = WeightAverage(module, decay=0.995)
    ... after every optimizer step:  average.update(module)
    average.module                   # the averaged copy (eval, best.pt, model.pt)

Short from-scratch runs (the CPU miniatures: a few hundred steps) end with weights that swing
from epoch to epoch; their average over the last few hundred steps is steadier, so the
best-epoch pick and the final model depend less on where a step happened to land (on the demo's
segmenter: a steady validation curve, the same test score; README, "Weight averaging"). Parameters and floating-point
buffers (BatchNorm statistics) are averaged in float32
whatever the training precision; integer buffers are copied.

The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so the random
initial weights do not linger in a run of only a few hundred steps (with a fixed 0.995 they
would still weigh 0.995^500 = 8 % after 500 steps). torch.optim.swa_utils.AveragedModel has no
such ramp, hence this small class.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mlps_dist import dist


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(module).eval()
        for tensor in self._tensors(self.module):
            tensor.requires_grad_(False)
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s current weights (call once per optimizer step)."""
        weight = 1.0 - self.current_decay()
        floats, targets = [], []
        for mine, theirs in zip(self._tensors(self.module), self._tensors(module), strict=True):
            if mine.is_floating_point():
                floats.append(mine)
                targets.append(theirs.detach().to(mine.dtype))
            else:
                mine.copy_(theirs)
        if floats:
            torch._foreach_lerp_(floats, targets, weight)
        self.updates += 1

    def sync(self) -> None:
        """Give every rank rank 0's average. The weights agree across DDP ranks anyway, but each
        rank's BatchNorm statistics are its own (as for the model, engine.Wrapped.sync_buffers)."""
        if dist.get_world_size() > 1:
            for tensor in self._tensors(self.module):
                torch.distributed.broadcast(tensor.data, src=0)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
