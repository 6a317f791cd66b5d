"""EfficientNet-Lite0: ImageNet weights by name, strides of the classifier and segmenter
variants, freezing, and the config's ``pretrained: imagenet``."""

import pytest
import torch

from mlps_dist.config import ConfigError, load_config
from mlps_dist.models import create_classifier, create_segmenter, resolve_pretrained
from mlps_dist.models.efficientnet import LiteClassifierBackbone, imagenet_weights_file


def test_imagenet_weights_fill_every_tensor_of_both_variants():
    state = torch.load(imagenet_weights_file(), map_location="cpu", weights_only=True)
    classifier = create_classifier("efficientnet_lite0", 4, "imagenet")
    segmenter = create_segmenter("deeplabv3plus_lite0", 4, "imagenet")
    head = {k for k in state if k.startswith(("_conv_head.", "_bn1."))}
    for backbone, dropped in ((classifier.backbone, set()), (segmenter.backbone, head)):
        own = backbone.state_dict()
        # the ImageNet classifier is dropped; the segmenter's encoder has no 1280-channel head
        assert set(own) == set(state) - {"_fc.weight", "_fc.bias"} - dropped
        for key, value in own.items():
            assert torch.equal(value, state[key]), key


def test_classifier_cams_at_stride_16_and_differentiable():
    model = create_classifier("efficientnet_lite0", 3).eval()
    x = torch.randn(2, 3, 96, 64)
    feats = model.forward_features(x)
    assert set(feats) == {"b4_5", "b5_2", "bn7"}
    for name, f in feats.items():
        assert f.shape == (2, model.backbone.feature_channels[name], 6, 4), name
    logits = model.logits_from_features(feats["bn7"])
    grads = torch.autograd.grad(logits[:, 0].sum(), list(feats.values()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_dilation_keeps_a_stride_8_grid_where_asked():
    backbone = LiteClassifierBackbone(output_stride=8).eval()
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert all(f.shape[-2:] == (8, 8) for f in feats.values())


def test_segmenter_logits_at_input_size_with_a_stride_16_encoder():
    model = create_segmenter("deeplabv3plus_lite0", 5).eval()
    x = torch.randn(1, 3, 96, 128)
    feats = model.backbone(x)
    assert feats["low"].shape[-2:] == (24, 32) and feats["high"].shape[-2:] == (6, 8)
    assert model(x).shape == (1, 5, 96, 128)
    model(x).sum().backward()  # every parameter takes part (DDP needs it)
    assert all(p.grad is not None for p in model.parameters())


def test_freeze_stages_and_bn():
    model = create_classifier("efficientnet_lite0", 2, freeze_stages=3, freeze_bn=True)
    backbone = model.backbone
    assert not any(p.requires_grad for p in backbone._conv_stem.parameters())
    frozen = [b for b, s in zip(backbone._blocks, backbone.stage_of_block) if s < 3]
    trained = [b for b, s in zip(backbone._blocks, backbone.stage_of_block) if s >= 3]
    assert frozen and all(not p.requires_grad for b in frozen for p in b.parameters())
    assert all(p.requires_grad for b in trained for p in b._expand_conv.parameters())
    model.train()
    assert not backbone._bn0.training


def test_imagenet_is_refused_for_networks_without_such_weights(tmp_path):
    with pytest.raises(ValueError, match="imagenet"):
        resolve_pretrained("small38", "imagenet")
    with pytest.raises(ConfigError, match="classifier.pretrained"):
        load_config("configs/demo.yaml", ["classifier.model=small38", "classifier.pretrained=imagenet"])
    cfg = load_config("configs/demo.yaml", ["classifier.model=efficientnet_lite0", "classifier.pretrained=imagenet"])
    assert cfg.classifier.pretrained == "imagenet"
