"""ResNet-38d (wide ResNet-38 with dilation, output stride 8) and its CPU miniature.

Module and parameter names follow the public PSA/MLPS definition (conv1a, b2, b2_1, ...,
b7, bn7; conv_branch2a, bn_branch2b1, ...) so that converted ImageNet weights and
checkpoints in that naming load without renaming. Blocks are pre-activation: each block
starts with BN+ReLU of its input, and the shortcut of a shape-changing block is a 1x1 conv
of that activated input.

Strides: conv1a 1, b2 2, b3 2, b4 2 -> stride 8 from b4 on; b5..b7 keep stride 8 and grow
their receptive field with dilation 2 (b5*) and 4 (b6, b7) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import freeze_batchnorm_affine, keep_batchnorm_in_eval


class ResBlock(nn.Module):
    """Pre-activation block of two 3x3 convs (b2..b5_2)."""

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        stride: int = 1,
        first_dilation: int | None = None,
        dilation: int = 1,
    ):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(
            in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(act)
        out = self.conv_branch2a(act)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck 1x1 -> 3x3 -> 1x1 with channel dropout (b6, b7).

    Widths out/4 -> out/2 -> out as in the public definition; the shortcut is always a
    1x1 conv (the public code never builds these blocks with matching shapes).
    """

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(act)
        out = self.conv_branch2a(act)
        out = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(out))))
        out = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(out))))
        return shortcut + out


@dataclass(frozen=True)
class Widths:
    """Channel widths of the network; ResNet-38d is Widths() and small38 divides them."""

    stem: int = 64
    s2: int = 128
    s3: int = 256
    s4: int = 512
    s5_mid: int = 512
    s5: int = 1024
    s6: int = 2048
    s7: int = 4096

    def scaled(self, divisor: int) -> Widths:
        return Widths(
            *(w // divisor for w in (self.stem, self.s2, self.s3, self.s4, self.s5_mid, self.s5, self.s6, self.s7))
        )


# Blocks in forward order with the stage they belong to (used by freeze_stages):
# stage 1 = conv1a, 2 = b2*, 3 = b3*, 4 = b4*, 5 = b5*, 6 = b6, 7 = b7 + bn7.
STAGE_OF = {
    "conv1a": 1,
    "b2": 2,
    "b2_1": 2,
    "b2_2": 2,
    "b3": 3,
    "b3_1": 3,
    "b3_2": 3,
    "b4": 4,
    "b4_1": 4,
    "b4_2": 4,
    "b4_3": 4,
    "b4_4": 4,
    "b4_5": 4,
    "b5": 5,
    "b5_1": 5,
    "b5_2": 5,
    "b6": 6,
    "b7": 7,
    "bn7": 7,
}

FEATURE_LAYERS = ("b4_5", "b5_2", "bn7")
BLOCKS = tuple(name for name in STAGE_OF if name not in ("conv1a", "bn7"))  # the residual blocks, in order


class ResNet38d(nn.Module):
    """Backbone returning the stride-8 feature maps named in FEATURE_LAYERS.

    freeze_stages=k fixes the weights of stages 1..k (the public MLPS code fixes conv1a
    and b2*, i.e. k=2); freeze_bn keeps every BatchNorm in eval mode with fixed affine
    parameters (the public code does this throughout, as batches of a few patches give
    poor batch statistics).
    """

    def __init__(
        self,
        widths: Widths = Widths(),  # noqa: B008
        freeze_stages: int = 0,
        freeze_bn: bool = False,
        dropout: tuple[float, float] = (0.3, 0.5),
    ):
        super().__init__()
        w = widths
        self.widths = w
        self.out_channels = w.s7
        self.feature_channels = {"b4_5": w.s4, "b5_2": w.s5, "bn7": w.s7}
        self.conv1a = nn.Conv2d(3, w.stem, 3, padding=1, bias=False)
        self.b2 = ResBlock(w.stem, w.s2, w.s2, stride=2)
        self.b2_1 = ResBlock(w.s2, w.s2, w.s2)
        self.b2_2 = ResBlock(w.s2, w.s2, w.s2)
        self.b3 = ResBlock(w.s2, w.s3, w.s3, stride=2)
        self.b3_1 = ResBlock(w.s3, w.s3, w.s3)
        self.b3_2 = ResBlock(w.s3, w.s3, w.s3)
        self.b4 = ResBlock(w.s3, w.s4, w.s4, stride=2)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", ResBlock(w.s4, w.s4, w.s4))
        self.b5 = ResBlock(w.s4, w.s5_mid, w.s5, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(w.s5, w.s5_mid, w.s5, dilation=2)
        self.b5_2 = ResBlock(w.s5, w.s5_mid, w.s5, dilation=2)
        self.b6 = BottleneckBlock(w.s5, w.s6, dilation=4, dropout=dropout[0])
        self.b7 = BottleneckBlock(w.s6, w.s7, dilation=4, dropout=dropout[1])
        self.bn7 = nn.BatchNorm2d(w.s7)
        self.freeze_stages = freeze_stages
        self.freeze_bn = freeze_bn
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        for name, stage in STAGE_OF.items():
            if stage <= self.freeze_stages:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)
        if self.freeze_bn:
            freeze_batchnorm_affine(self)

    def train(self, mode: bool = True) -> ResNet38d:
        super().train(mode)
        if self.freeze_bn:  # running statistics stay those of the pretrained weights
            keep_batchnorm_in_eval(self)  # SyncBatchNorm (multi-GPU) included
        return self

    def run_blocks(self, x: torch.Tensor, keep: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """conv1a and every block in order: (ReLU(BN(b7)), the raw outputs of the blocks in ``keep``)."""
        x = self.conv1a(x)
        kept = {}
        for name in BLOCKS:
            x = getattr(self, name)(x)
            if name in keep:
                kept[name] = x
        return F.relu(self.bn7(x)), kept

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"b4_5", "b5_2", "bn7"}: raw block outputs for b4_5/b5_2, ReLU(BN(b7)) for bn7."""
        bn7, kept = self.run_blocks(x, ("b4_5", "b5_2"))
        return {**kept, "bn7": bn7}


class ResNet38dEncoder(ResNet38d):
    """The classifier's backbone as stage 3's encoder: "low" = the end of b3 (stride 4) for the
    DeepLab decoder, "high" = ReLU(BN(b7)) (stride 8) for ASPP. Its parameters are named as the
    classifier's backbone, so the trained stage-1 backbone loads as it is
    (``segmenter.pretrained: classifier``)."""

    def __init__(self, widths: Widths):
        super().__init__(widths)
        self.low_channels = widths.s3

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        high, kept = self.run_blocks(x, ("b3_2",))
        return {"low": kept["b3_2"], "high": high}


def create_resnet38d(freeze_stages: int = 0, freeze_bn: bool = False) -> ResNet38d:
    """The paper backbone: ~104 M parameters, 4096-channel bn7."""
    return ResNet38d(Widths(), freeze_stages=freeze_stages, freeze_bn=freeze_bn)


def create_small38(freeze_stages: int = 0, freeze_bn: bool = False) -> ResNet38d:
    """CPU miniature: every block of ResNet-38d with all widths / 8 (~1.6 M parameters,
    512-channel bn7). Same block types, strides and dilations, so CAMs of b4_5, b5_2 and
    bn7 have the same stride and relative receptive fields as in the paper network."""
    return ResNet38d(Widths().scaled(8), freeze_stages=freeze_stages, freeze_bn=freeze_bn)


def create_small38_encoder() -> ResNet38dEncoder:
    """small38 as a segmenter encoder (deeplabv3plus_small38)."""
    return ResNet38dEncoder(Widths().scaled(8))
