"""DeepLab-v3+ (Chen et al. 2018): ResNet encoder at output stride 16, ASPP, and a decoder
that fuses the ASPP output with projected stride-4 features; logits upsampled to the input.

Layout as in the public MLPS stage-2 code: ASPP = 1x1 + three 3x3 atrous branches (6, 12,
18) + image pooling, each conv-BN-ReLU, concatenated, projected by 1x1 conv-BN-ReLU and
dropout 0.5; decoder = 1x1 projection of layer1 to 48 channels, two 3x3 conv-BN-ReLU (with
dropout 0.5 and 0.1) and a 1x1 classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import create_resnet101, create_resnet_small


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, in_ch: int, out_ch: int = 256, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_ch, out_ch, 1)] +
                                      [_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates])
        # Image-level branch: BN over a 1x1 map needs batches of >= 2 per process in training.
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_ch, out_ch, 1))
        self.project = nn.Sequential(_conv_bn_relu(out_ch * (len(rates) + 2), out_ch, 1), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x)
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class Decoder(nn.Module):
    def __init__(self, low_ch: int, aspp_ch: int, num_classes: int, low_proj: int = 48, width: int = 256):
        super().__init__()
        self.low_proj = _conv_bn_relu(low_ch, low_proj, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(aspp_ch + low_proj, width, 3), nn.Dropout(0.5),
                                  _conv_bn_relu(width, width, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.low_proj(low)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))


class DeepLabV3Plus(nn.Module):
    """``forward(x) -> (B,C,H,W)`` logits at the input resolution, for any H, W."""

    def __init__(self, backbone: nn.Module, num_classes: int, aspp_ch: int = 256,
                 low_proj: int = 48, decoder_width: int = 256):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.aspp = ASPP(backbone.out_channels, aspp_ch)
        self.decoder = Decoder(backbone.low_channels, aspp_ch, num_classes, low_proj, decoder_width)
        for m in list(self.aspp.modules()) + list(self.decoder.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        logits = self.decoder(self.aspp(feats["high"]), feats["low"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbone (base LR) vs. ASPP + decoder (the randomly initialised "head", 10x LR)."""
        head = list(self.aspp.parameters()) + list(self.decoder.parameters())
        return {"backbone": [p for p in self.backbone.parameters() if p.requires_grad],
                "head": [p for p in head if p.requires_grad]}


def create_deeplabv3plus(name: str, num_classes: int, pretrained: str = "") -> DeepLabV3Plus:
    if name == "deeplabv3plus_resnet101":
        model = DeepLabV3Plus(create_resnet101(), num_classes)
    elif name == "deeplabv3plus_small":
        # Same design, narrower: the decoder runs at stride 4, where 256 channels would
        # dominate the cost on a CPU.
        model = DeepLabV3Plus(create_resnet_small(), num_classes, aspp_ch=64, low_proj=16, decoder_width=64)
    else:
        raise ValueError(f"unknown segmenter '{name}'; use deeplabv3plus_resnet101 or deeplabv3plus_small")
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model.backbone, pretrained, kind="resnet")
    return model
