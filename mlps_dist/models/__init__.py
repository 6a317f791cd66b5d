"""Networks: the stage-1 classifier and the stage-3 segmenter, built by name."""

from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .resnet38d import FEATURE_LAYERS, create_resnet38d, create_small38

CLASSIFIER_NAMES = ("resnet38d", "small38")
SEGMENTER_NAMES = ("deeplabv3plus_resnet101", "deeplabv3plus_small")


def create_classifier(name: str, num_classes: int, pretrained: str = "", *,
                      freeze_stages: int = 0, freeze_bn: bool = False, dropout: float = 0.5,
                      pda_attention: str = "normalised") -> Classifier:
    """``resnet38d`` (paper) or ``small38`` (CPU); ``pretrained`` = local weights file for
    the backbone ("" = random init); ``dropout`` = channel dropout before the head."""
    if name == "resnet38d":
        backbone = create_resnet38d(freeze_stages=freeze_stages, freeze_bn=freeze_bn)
    elif name == "small38":
        backbone = create_small38(freeze_stages=freeze_stages, freeze_bn=freeze_bn)
    else:
        raise ValueError(f"unknown classifier '{name}'; set classifier.model to one of {', '.join(CLASSIFIER_NAMES)}")
    model = Classifier(backbone, num_classes, FEATURE_LAYERS, dropout=dropout, pda_attention=pda_attention)
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model.backbone, pretrained, kind="resnet38d")
    return model


def create_segmenter(name: str, num_classes: int, pretrained: str = "", multi_grid=(1, 2, 4)) -> nn.Module:
    """``deeplabv3plus_resnet101`` (paper) or ``deeplabv3plus_small`` (CPU); ``pretrained`` =
    a whole pytorch-deeplab-xception checkpoint or an ImageNet ResNet backbone file."""
    if name not in SEGMENTER_NAMES:
        raise ValueError(f"unknown segmenter '{name}'; set segmenter.model to one of {', '.join(SEGMENTER_NAMES)}")
    from .deeplab import create_deeplabv3plus

    return create_deeplabv3plus(name, num_classes, pretrained, multi_grid=tuple(multi_grid))


__all__ = ["create_classifier", "create_segmenter", "Classifier", "CLASSIFIER_NAMES", "SEGMENTER_NAMES"]
