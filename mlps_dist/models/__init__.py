"""Networks: the stage-1 classifier and the stage-3 segmenter, built by name."""

from __future__ import annotations

from torch import nn

from mlps_dist.config import IMAGENET_NAMES

from .classifier import Classifier
from .resnet38d import FEATURE_LAYERS, create_resnet38d, create_small38

CLASSIFIER_NAMES = ("resnet38d", "small38", "efficientnet_lite0")
SEGMENTER_NAMES = ("deeplabv3plus_resnet101", "deeplabv3plus_small", "deeplabv3plus_small38", "deeplabv3plus_lite0")


def create_classifier(
    name: str,
    num_classes: int,
    pretrained: str = "",
    *,
    freeze_stages: int = 0,
    freeze_bn: bool = False,
    dropout: float = 0.5,
    pda_attention: str = "normalised",
) -> Classifier:
    """``resnet38d`` (paper), ``small38`` (CPU, from scratch) or ``efficientnet_lite0`` (CPU,
    ImageNet); ``pretrained`` = local weights file for the backbone, "imagenet" for the weights
    package of an IMAGENET_NAMES network, "" = random init; ``dropout`` = channel dropout
    before the head."""
    if name == "resnet38d":
        backbone = create_resnet38d(freeze_stages=freeze_stages, freeze_bn=freeze_bn)
    elif name == "small38":
        backbone = create_small38(freeze_stages=freeze_stages, freeze_bn=freeze_bn)
    elif name == "efficientnet_lite0":
        from .efficientnet import LiteClassifierBackbone

        backbone = LiteClassifierBackbone(freeze_stages=freeze_stages, freeze_bn=freeze_bn)
    else:
        raise ValueError(f"unknown classifier '{name}'; set classifier.model to one of {', '.join(CLASSIFIER_NAMES)}")
    model = Classifier(backbone, num_classes, FEATURE_LAYERS, dropout=dropout, pda_attention=pda_attention)
    if pretrained:
        from .weights import load_pretrained

        kind = "efficientnet" if name == "efficientnet_lite0" else "resnet38d"
        load_pretrained(model.backbone, resolve_pretrained(name, pretrained), kind=kind)
    return model


def resolve_pretrained(name: str, pretrained: str) -> str:
    """The weights file a ``pretrained`` value names: "imagenet" = the installed ImageNet
    weights of ``name``; anything else is a path."""
    if pretrained != "imagenet":
        return pretrained
    if name not in IMAGENET_NAMES:
        raise ValueError(
            f"'pretrained: imagenet' is available for {', '.join(IMAGENET_NAMES)}, not '{name}'; "
            f"give a weights file instead"
        )
    from .efficientnet import imagenet_weights_file

    return imagenet_weights_file()


def create_segmenter(name: str, num_classes: int, pretrained: str = "", multi_grid=(1, 2, 4)) -> nn.Module:
    """``deeplabv3plus_resnet101`` (paper), ``deeplabv3plus_small`` (CPU, from scratch),
    ``deeplabv3plus_small38`` (CPU, the small38 classifier's backbone as encoder) or
    ``deeplabv3plus_lite0`` (CPU, EfficientNet-Lite0 encoder); ``pretrained`` = a whole
    pytorch-deeplab-xception checkpoint, an ImageNet backbone file, or "imagenet" (a run's
    classifier, ``segmenter.pretrained: classifier``, is loaded by stage 3 itself)."""
    if name not in SEGMENTER_NAMES:
        raise ValueError(f"unknown segmenter '{name}'; set segmenter.model to one of {', '.join(SEGMENTER_NAMES)}")
    from .deeplab import create_deeplabv3plus

    return create_deeplabv3plus(
        name, num_classes, resolve_pretrained(name, pretrained) if pretrained else "", multi_grid=tuple(multi_grid)
    )


__all__ = [
    "create_classifier",
    "create_segmenter",
    "resolve_pretrained",
    "Classifier",
    "CLASSIFIER_NAMES",
    "SEGMENTER_NAMES",
    "IMAGENET_NAMES",
]
