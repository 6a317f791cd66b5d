"""The stage-3 network against pytorch-deeplab-xception: its checkpoint layout loads as a
whole (classifier dropped, everything else by name), multi-grid dilations, and the tool
that checks and extracts such a file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mlps_dist.models import create_segmenter
from mlps_dist.models.weights import load_segmenter_weights

REPO = Path(__file__).resolve().parents[2]


def _bn(prefix: str, ch: int, tracked: bool) -> dict[str, tuple]:
    out = {f"{prefix}.{leaf}": (ch,) for leaf in ("weight", "bias", "running_mean", "running_var")}
    if tracked:  # torch >= 0.4.1 BatchNorm (and SynchronizedBatchNorm2d, a _BatchNorm) saves this counter
        out[f"{prefix}.num_batches_tracked"] = ()
    return out


def public_deeplab_resnet_keys(num_classes: int = 21, tracked: bool = True) -> dict[str, tuple]:
    """Key -> shape of ``DeepLab(backbone='resnet', output_stride=16, num_classes=21)`` as
    modeling/{deeplab,aspp,decoder,backbone/resnet}.py of pytorch-deeplab-xception build it
    (written from that code, not from ours)."""
    keys = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn("backbone.bn1", 64, tracked)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 23), (512, 3)], start=1):
        for b in range(blocks):
            p = f"backbone.layer{layer}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys.update(_bn(f"{p}.bn1", planes, tracked))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{p}.bn2", planes, tracked))
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            keys.update(_bn(f"{p}.bn3", planes * 4, tracked))
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4, tracked))
            inplanes = planes * 4
    for i, k in enumerate([1, 3, 3, 3], start=1):
        keys[f"aspp.aspp{i}.atrous_conv.weight"] = (256, 2048, k, k)
        keys.update(_bn(f"aspp.aspp{i}.bn", 256, tracked))
    keys["aspp.global_avg_pool.1.weight"] = (256, 2048, 1, 1)
    keys.update(_bn("aspp.global_avg_pool.2", 256, tracked))
    keys["aspp.conv1.weight"] = (256, 1280, 1, 1)
    keys.update(_bn("aspp.bn1", 256, tracked))
    keys["decoder.conv1.weight"] = (48, 256, 1, 1)
    keys.update(_bn("decoder.bn1", 48, tracked))
    keys["decoder.last_conv.0.weight"] = (256, 304, 3, 3)
    keys.update(_bn("decoder.last_conv.1", 256, tracked))
    keys["decoder.last_conv.4.weight"] = (256, 256, 3, 3)
    keys.update(_bn("decoder.last_conv.5", 256, tracked))
    keys["decoder.last_conv.8.weight"] = (num_classes, 256, 1, 1)
    keys["decoder.last_conv.8.bias"] = (num_classes,)
    return keys


def write_public_checkpoint(path: Path, tracked: bool = True, drop: tuple = (), extra: tuple = ()) -> dict:
    """A file as train.py's Saver writes it: {'epoch', 'state_dict' (model.module), 'optimizer'
    (SGD with momentum buffers, two param groups), 'best_pred' (a numpy float64)}."""
    shapes = public_deeplab_resnet_keys(tracked=tracked)
    state = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key in drop:
            continue
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + i, dtype=torch.int64)
        else:  # a distinct value per tensor, so a misplaced tensor shows; stored as one
            # number broadcast to the shape (stride 0), which keeps the file small
            state[key] = torch.full((1,) * len(shape), 0.001 * (i + 1)).expand(shape)
    for key in extra:
        state[key] = torch.zeros(3)
    params = [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    backbone = [i for i, k in enumerate(params) if k.startswith("backbone.")]
    head = [i for i, k in enumerate(params) if not k.startswith("backbone.")]
    group = {"momentum": 0.9, "dampening": 0, "weight_decay": 5e-4, "nesterov": False}
    optimizer = {
        "state": {i: {"momentum_buffer": torch.zeros(1)} for i in range(0, len(params), 50)},
        "param_groups": [{**group, "lr": 0.007, "params": backbone}, {**group, "lr": 0.07, "params": head}],
    }
    torch.save({"epoch": 50, "state_dict": state, "optimizer": optimizer, "best_pred": np.float64(0.789)}, path)
    return state


@pytest.fixture(scope="module")
def public_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("voc") / "deeplab-resnet.pth.tar"
    return path, write_public_checkpoint(path)


@pytest.fixture(scope="module")
def resnet101_deeplab():
    """One real network for the loading tests (building ResNet-101 is the slow part);
    each test loads a whole file into it, so none depends on another's values."""
    return create_segmenter("deeplabv3plus_resnet101", num_classes=4)


def test_public_voc_checkpoint_initialises_the_whole_network(public_file, resnet101_deeplab, caplog):
    path, state = public_file
    model = resnet101_deeplab
    torch.nn.init.zeros_(model.decoder.last_conv[8].weight)
    with caplog.at_level(logging.INFO):
        load_segmenter_weights(model, path)  # what segmenter.pretrained=PATH does after building
    own = model.state_dict()
    assert set(own) == set(state)  # the same layout, key for key
    for key, value in state.items():
        if key.startswith("decoder.last_conv.8."):  # the 21-class conv is not copied into a 4-class one
            assert own[key].shape[0] == 4 and torch.equal(
                own["decoder.last_conv.8.weight"], torch.zeros_like(own["decoder.last_conv.8.weight"])
            )
        else:
            assert torch.equal(own[key], value), key
    text = caplog.text
    assert "dropped (classifier head): decoder.last_conv.8.weight, decoder.last_conv.8.bias" in text
    assert "missing (left at their initial values): decoder.last_conv.8.weight, decoder.last_conv.8.bias" in text
    assert "unexpected" not in text


def test_every_unmatched_key_is_reported_by_name(tmp_path, resnet101_deeplab):
    path = tmp_path / "partial.pth.tar"
    gone = ("backbone.layer3.17.conv2.weight", "aspp.aspp3.bn.running_var")
    write_public_checkpoint(path, tracked=False, drop=gone, extra=("decoder.extra.weight",))
    report = load_segmenter_weights(resnet101_deeplab, path)
    assert report.unexpected == ["decoder.extra.weight"]
    assert report.missing == [*gone, "decoder.last_conv.8.weight", "decoder.last_conv.8.bias"]
    assert all(k in report.summary() for k in (*gone, "decoder.extra.weight"))
    # files without num_batches_tracked (older torch) load the same
    assert len(report.loaded) == len(public_deeplab_resnet_keys(tracked=False)) - 2 - len(gone)


def test_multi_grid_layer4_and_output_stride_16():
    with torch.device("meta"):  # structure and shapes only
        model = create_segmenter("deeplabv3plus_resnet101", num_classes=3).eval()
        plain = create_segmenter("deeplabv3plus_resnet101", num_classes=3, multi_grid=())
        feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert [b.conv2.dilation for b in model.backbone.layer4] == [(2, 2), (4, 4), (8, 8)]
    assert [b.conv2.padding for b in model.backbone.layer4] == [(2, 2), (4, 4), (8, 8)]
    assert model.backbone.layer4[0].conv2.stride == (1, 1)
    assert [b.conv2.dilation for b in plain.backbone.layer4] == [(1, 1), (2, 2), (2, 2)]
    assert feats["high"].shape == (1, 2048, 4, 4) and feats["low"].shape == (1, 256, 16, 16)


def test_upsampling_aligns_corners():
    """align_corners=True: the output's corner pixels equal the decoder's corner logits."""
    model = create_segmenter("deeplabv3plus_small", num_classes=2).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        feats = model.backbone(x)
        low_res = model.decoder(model.aspp(feats["high"]), feats["low"])
        out = model(x)
    for (i, j), (a, b) in zip([(0, 0), (0, -1), (-1, 0), (-1, -1)], [(0, 0), (0, -1), (-1, 0), (-1, -1)]):
        assert torch.allclose(out[0, :, i, j], low_res[0, :, a, b], atol=1e-5)


def test_tool_extracts_and_checks_the_public_checkpoint(public_file, tmp_path, capsys):
    path, state = public_file
    from mlps_dist.cli import weights as tool

    out = tmp_path / "deeplab_voc.pth"
    assert tool.main(["--deeplab", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"loaded {len(state) - 2} tensors" in printed and "decoder.last_conv.8.weight" in printed
    written = torch.load(out, weights_only=True)
    assert set(written) == set(state) - {"decoder.last_conv.8.weight", "decoder.last_conv.8.bias"}
    assert all(torch.equal(written[k], state[k]) for k in written)

    partial = tmp_path / "partial.pth.tar"
    write_public_checkpoint(partial, drop=("backbone.layer1.0.bn1.weight",))
    assert tool.main(["--deeplab", str(partial), "--out", str(tmp_path / "p.pth")]) == 1
    assert "backbone.layer1.0.bn1.weight" in capsys.readouterr().out
