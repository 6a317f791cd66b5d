"""DeepLab-v3+ (Chen et al. 2018): ResNet encoder at output stride 16, ASPP, and a decoder
that fuses the ASPP output with projected stride-4 features; logits upsampled to the input.

Module names, shapes and resampling are those of pytorch-deeplab-xception (the network the
public MLPS stage-2 code trains), so its VOC-trained ``deeplab-resnet.pth.tar`` loads as a
whole: ASPP = aspp1 (1x1) + aspp2..4 (3x3 atrous 6, 12, 18), each conv-BN-ReLU, plus
global_avg_pool (pool, 1x1 conv, BN, ReLU); concatenated, projected by conv1/bn1/ReLU and
dropout 0.5. Decoder = conv1/bn1 (1x1 projection of layer1 to 48 channels) and last_conv =
[3x3 conv, BN, ReLU, dropout 0.5, 3x3 conv, BN, ReLU, dropout 0.1, 1x1 classifier]; every
bilinear resize uses ``align_corners=True`` as there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import create_resnet101, create_resnet_small

CLASSIFIER_PREFIX = "decoder.last_conv.8."  # the 1x1 class conv: dropped from pretrained files


class _ASPPModule(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int):
        super().__init__()
        pad = 0 if kernel == 1 else dilation
        self.atrous_conv = nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    def __init__(self, in_ch: int, out_ch: int = 256, rates: tuple[int, int, int] = (6, 12, 18)):
        super().__init__()
        self.aspp1 = _ASPPModule(in_ch, out_ch, 1, 1)
        self.aspp2 = _ASPPModule(in_ch, out_ch, 3, rates[0])
        self.aspp3 = _ASPPModule(in_ch, out_ch, 3, rates[1])
        self.aspp4 = _ASPPModule(in_ch, out_ch, 3, rates[2])
        # Image-level branch: BN over a 1x1 map needs batches of >= 2 per process in training.
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(out_ch * 5, out_ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)]
        pooled = self.global_avg_pool(x)
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
        return self.dropout(self.relu(self.bn1(self.conv1(torch.cat(outs, dim=1)))))


class Decoder(nn.Module):
    def __init__(self, low_ch: int, aspp_ch: int, num_classes: int, low_proj: int = 48, width: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(low_ch, low_proj, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(low_proj)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(aspp_ch + low_proj, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(width, num_classes, 1),
        )  # index 8: the classifier (CLASSIFIER_PREFIX)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.last_conv[8]

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.relu(self.bn1(self.conv1(low)))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat([high, low], dim=1))


class DeepLabV3Plus(nn.Module):
    """``forward(x) -> (B,C,H,W)`` logits at the input resolution, for any H, W."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, aspp_ch: int = 256, low_proj: int = 48, decoder_width: int = 256
    ):
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
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbone (base LR) vs. ASPP + decoder (the "head", 10x LR, as the public code)."""
        head = list(self.aspp.parameters()) + list(self.decoder.parameters())
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in head if p.requires_grad],
        }


def create_deeplabv3plus(
    name: str, num_classes: int, pretrained: str = "", multi_grid: tuple[int, ...] = (1, 2, 4)
) -> DeepLabV3Plus:
    """``multi_grid`` (ResNet-101 only): layer4 dilation multipliers; () = torchvision's layer4."""
    if name == "deeplabv3plus_resnet101":
        model = DeepLabV3Plus(create_resnet101(multi_grid=tuple(multi_grid)), num_classes)
    elif name == "deeplabv3plus_small":
        # Same design, narrower: the decoder runs at stride 4, where 256 channels would
        # dominate the cost on a CPU. Its single-block layer4 has no multi-grid.
        model = DeepLabV3Plus(create_resnet_small(), num_classes, aspp_ch=64, low_proj=16, decoder_width=64)
    elif name == "deeplabv3plus_small38":
        from .resnet38d import create_small38_encoder

        # The stage-1 network (small38) as encoder, with the small variant's ASPP and decoder:
        # segmenter.pretrained: classifier starts it from the run's trained classifier.
        model = DeepLabV3Plus(create_small38_encoder(), num_classes, aspp_ch=64, low_proj=16, decoder_width=64)
    elif name == "deeplabv3plus_lite0":
        from .efficientnet import LiteSegmenterBackbone

        # The small variant's ASPP and decoder widths: they run at stride 16 and 4 and would
        # cost more than the encoder at the widths of the paper network.
        model = DeepLabV3Plus(LiteSegmenterBackbone(), num_classes, aspp_ch=64, low_proj=16, decoder_width=64)
    else:
        raise ValueError(f"unknown segmenter '{name}'")
    if pretrained:
        from .weights import load_pretrained, load_segmenter_weights

        if name == "deeplabv3plus_lite0":
            load_pretrained(model.backbone, pretrained, kind="efficientnet_encoder")
        else:
            load_segmenter_weights(model, pretrained)
    return model
