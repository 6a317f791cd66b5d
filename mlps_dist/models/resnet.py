"""ResNet backbones for DeepLab-v3+, in torchvision's parameter layout.

Names (conv1, bn1, layer1..layer4, blocks with conv1/bn1/conv2/bn2[/conv3/bn3] and
downsample.0/.1) match torchvision's ImageNet state dicts, so those load directly (the fc
classifier is not built). ``dilate_last`` turns layer4's stride into dilation, giving
output stride 16 as DeepLab-v3+ uses. ``multi_grid`` (e.g. (1, 2, 4)) gives layer4's blocks
the dilations 2 x (1, 2, 4), first block included: pytorch-deeplab-xception's ``_make_MG_unit``
(torchvision's dilated layer4 instead has dilations 1, 2, 2).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """Returns {"low": layer1 output (stride 4), "high": layer4 output (stride 16 or 32)}."""

    def __init__(
        self,
        block: type,
        depths: tuple[int, int, int, int],
        widths: tuple[int, int, int, int],
        stem_width: int = 64,
        dilate_last: bool = True,
        multi_grid: tuple[int, ...] = (),
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self._in_ch = stem_width
        self._dilation = 1
        self.layer1 = self._make_layer(block, widths[0], depths[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], depths[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], depths[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], depths[3], stride=2, dilate=dilate_last, multi_grid=multi_grid)
        self.low_channels = widths[0] * block.expansion
        self.out_channels = widths[3] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type, width: int, depth: int, stride: int, dilate: bool = False, multi_grid: tuple[int, ...] = ()
    ) -> nn.Sequential:
        first_dilation = self._dilation
        if dilate:  # keep the resolution; widen the receptive field instead
            self._dilation *= stride
            stride = 1
        if multi_grid:
            if len(multi_grid) != depth:
                raise ValueError(
                    f"multi_grid {tuple(multi_grid)} needs one entry per block of the last stage ({depth})"
                )
            dilations = [self._dilation * g for g in multi_grid]
        else:
            dilations = [first_dilation] + [self._dilation] * (depth - 1)
        out_ch = width * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self._in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        blocks = [block(self._in_ch, width, stride, dilations[0], downsample)]
        self._in_ch = out_ch
        blocks += [block(out_ch, width, 1, d) for d in dilations[1:]]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "high": high}


def create_resnet101(dilate_last: bool = True, multi_grid: tuple[int, ...] = ()) -> ResNet:
    """ResNet-101 (torchvision layout; 42.5 M parameters, the fc classifier is not built)."""
    return ResNet(
        Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), stem_width=64, dilate_last=dilate_last, multi_grid=multi_grid
    )


def create_resnet_small(dilate_last: bool = True) -> ResNet:
    """A ResNet-10-like basic-block backbone at a quarter of ResNet-18's widths, for CPU."""
    return ResNet(BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), stem_width=16, dilate_last=dilate_last)
