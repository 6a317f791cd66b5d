"""freeze_bn holds through the SyncBatchNorm conversion of multi-GPU runs, and the conversion
happens only where some BatchNorm layer computes batch statistics (checked on CPU through
the conversion and the modes; the GPU forward is in tests/system/test_gpu.py)."""

from __future__ import annotations

import torch
from torch import nn

from mlps_dist.models import create_classifier, create_segmenter
from mlps_dist.models.batchnorm import batchnorm_layers, batchnorm_trains, sync_batchnorm_helps

CUDA = torch.device("cuda", 0)  # only named, never used: the decision depends on the device type


def test_freeze_bn_keeps_sync_batchnorm_in_eval_with_fixed_affine():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(create_classifier("small38", 4, freeze_bn=True))
    layers = batchnorm_layers(model.backbone)
    assert layers and all(isinstance(m, nn.SyncBatchNorm) for m in layers)
    model.train()
    assert model.training and all(not m.training for m in layers)
    assert all(not p.requires_grad for m in layers for p in (m.weight, m.bias))
    model.eval()
    model.train()  # a second epoch
    assert all(not m.training for m in layers)


def test_without_freeze_bn_sync_batchnorm_trains():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(create_classifier("small38", 4, freeze_bn=False))
    model.train()
    assert all(m.training for m in batchnorm_layers(model))


def test_sync_batchnorm_only_where_batch_statistics_are_computed():
    frozen = create_classifier("small38", 4, freeze_bn=True)
    trained = create_classifier("small38", 4, freeze_bn=False)
    segmenter = create_segmenter("deeplabv3plus_small", 4)
    assert not batchnorm_trains(frozen) and batchnorm_trains(trained) and batchnorm_trains(segmenter)
    assert not sync_batchnorm_helps(frozen, 8, CUDA)  # all frozen: nothing to synchronise
    assert sync_batchnorm_helps(segmenter, 8, CUDA)
    assert not sync_batchnorm_helps(segmenter, 1, CUDA)  # one rank: nobody to share with
    assert not sync_batchnorm_helps(segmenter, 8, torch.device("cpu"))  # SyncBatchNorm runs on CUDA only
    segmenter.eval()
    batchnorm_trains(segmenter)
    assert not segmenter.training  # asking does not change the modes
