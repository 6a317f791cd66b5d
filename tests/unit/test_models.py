"""Shapes, strides, heads, parameter groups and freeze options of the networks."""

import pytest
import torch
from torch import nn

from mlps_dist.models import create_classifier, create_segmenter


def test_small38_features_all_stride_8_and_differentiable():
    model = create_classifier("small38", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 48)
    feats = model.forward_features(x)
    assert model.cam_layers == ("b4_5", "b5_2", "bn7")
    assert set(feats) == set(model.cam_layers)
    chans = model.backbone.feature_channels
    for name, f in feats.items():
        assert f.shape == (2, chans[name], 8, 6), name
    assert (feats["bn7"] >= 0).all()  # bn7 is taken after its ReLU
    logits = model.logits_from_features(feats["bn7"])
    assert logits.shape == (2, 3)
    grads = torch.autograd.grad(logits[:, 1].sum(), [feats["b4_5"], feats["b5_2"], feats["bn7"]])
    assert all(g.abs().sum() > 0 for g in grads)
    assert torch.allclose(model(x), logits, atol=1e-5)


def test_small38_is_small():
    model = create_classifier("small38", num_classes=4)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 3e6


def test_resnet38d_layout_and_strides():
    model = create_classifier("resnet38d", num_classes=5).eval()
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("backbone.")}
    expected = {"conv1a", "b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b7", "bn7", "b6", "b5", "b5_1", "b5_2"} | {
        f"b4_{i}" for i in range(1, 6)
    }
    assert names == expected
    assert model.head.weight.shape == (5, 4096, 1, 1) and model.head.bias is None
    assert model.backbone.b5.conv_branch2b1.dilation == (2, 2)
    assert model.backbone.b7.conv_branch2b1.dilation == (4, 4)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert feats["b4_5"].shape == (1, 512, 4, 4)
    assert feats["b5_2"].shape == (1, 1024, 4, 4)
    assert feats["bn7"].shape == (1, 4096, 4, 4)


def test_head_and_param_groups_cover_trainable_parameters_once():
    model = create_classifier("small38", num_classes=2)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "head"}
    assert groups["head"] == [model.head.weight]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_stages_and_freeze_bn():
    model = create_classifier("small38", num_classes=2, freeze_stages=2, freeze_bn=True)
    bb = model.backbone
    assert not bb.conv1a.weight.requires_grad
    assert not any(p.requires_grad for p in bb.b2_2.parameters())
    assert bb.b3.conv_branch2a.weight.requires_grad
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    model.train()
    assert model.training and all(not m.training for m in bns)
    assert model.dropout7.training
    before = bb.bn7.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bb.bn7.running_mean)  # eval-mode BN: stats untouched
    trainable = {id(p) for p in model.param_groups()["backbone"]}
    assert id(bb.conv1a.weight) not in trainable and id(bb.bn7.weight) not in trainable

    free = create_classifier("small38", num_classes=2).train()
    assert all(m.training for m in free.modules() if isinstance(m, nn.BatchNorm2d))


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="small38"):
        create_classifier("resnet50", 4)
    with pytest.raises(ValueError, match="deeplabv3plus_small"):
        create_segmenter("unet", 4)


@pytest.mark.parametrize("size", [(97, 113), (64, 64), (50, 31)])
def test_small_deeplab_logits_at_input_resolution(size):
    torch.manual_seed(0)
    model = create_segmenter("deeplabv3plus_small", num_classes=3).train()
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 3, *size)
    out.logsumexp(1).mean().backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_deeplab_param_groups_split_backbone_from_aspp_and_decoder():
    model = create_segmenter("deeplabv3plus_small", num_classes=4)
    groups = model.param_groups()
    backbone = {id(p) for p in groups["backbone"]}
    head = {id(p) for p in groups["head"]}
    assert not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert id(model.backbone.layer4[0].conv1.weight) in backbone
    assert id(model.decoder.classifier.weight) in head and id(model.aspp.conv1.weight) in head


def test_resnet101_deeplab_torchvision_layout_and_output_stride_16():
    model = create_segmenter("deeplabv3plus_resnet101", num_classes=5).eval()
    keys = set(model.backbone.state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer3.22.conv3.weight",
        "layer4.2.bn3.running_var",
    ):
        assert key in keys, key
    assert "layer3.23.conv1.weight" not in keys and not any(k.startswith("fc.") for k in keys)
    assert model.backbone.layer4[1].conv2.dilation == (4, 4)  # multi-grid (1, 2, 4) x 2
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    assert feats["low"].shape == (1, 256, 9, 12)  # stride 4
    assert feats["high"].shape == (1, 2048, 3, 3)  # stride 16, not 32
    assert out.shape == (1, 5, 33, 47)


def test_segmenter_loads_torchvision_format_weights(tmp_path):
    source = create_segmenter("deeplabv3plus_small", num_classes=2).backbone.state_dict()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    model = create_segmenter("deeplabv3plus_small", num_classes=2, pretrained=str(path))
    assert torch.equal(model.backbone.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    with pytest.raises(ValueError, match="imagenet.pth"):  # ResNet-101 shapes differ
        create_segmenter("deeplabv3plus_resnet101", num_classes=2, pretrained=str(path))
