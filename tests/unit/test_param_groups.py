"""The optimizer's parameter groups: the public stage-1 recipe (backbone weights 1x with
weight decay, biases 2x without, head weights 10x with, head biases 20x without; conv1a and
b2* frozen) and the segmenter's own rule (1x/10x, decay on everything)."""

from __future__ import annotations

import pytest
import torch

from mlps_dist.config import load_config
from mlps_dist.data import batching
from mlps_dist.models import create_classifier, create_segmenter
from mlps_dist.models.resnet38d import STAGE_OF
from mlps_dist.train import parallel


def _groups(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_classifier_groups_follow_the_public_recipe_in_the_paper_configs():
    cfg = load_config("configs/luad.yaml")
    train = cfg.classifier
    model = create_classifier("small38", 4, freeze_stages=train.freeze_stages, freeze_bn=False)
    model.head.bias = torch.nn.Parameter(torch.zeros(4))  # the head has no bias; give it one to see its group
    groups = _groups(parallel.create_optimizer(model.param_groups(), train))
    lr, wd = train.lr, train.weight_decay
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "backbone.weight": (lr, wd),
        "backbone.bias": (pytest.approx(2 * lr), 0.0),
        "head.weight": (pytest.approx(10 * lr), wd),
        "head.bias": (pytest.approx(20 * lr), 0.0),
    }
    assert all(p.ndim > 1 for p in groups["backbone.weight"]["params"])
    assert all(p.ndim == 1 for p in groups["backbone.bias"]["params"])  # trained norm affine goes here too
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and {n.split(".")[0] for n in frozen} == {"conv1a", "b2", "b2_1", "b2_2"}
    assert all(STAGE_OF[n.split(".")[0]] <= 2 for n in frozen)
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_segmenter_keeps_one_rule_for_weights_and_biases():
    cfg = load_config("configs/luad.yaml")
    model = create_segmenter("deeplabv3plus_small", 4)
    groups = _groups(parallel.create_optimizer(model.param_groups(), cfg.segmenter))
    lr, wd = cfg.segmenter.lr, cfg.segmenter.weight_decay
    assert groups["backbone.weight"]["lr"] == groups["backbone.bias"]["lr"] == lr
    assert groups["head.weight"]["lr"] == groups["head.bias"]["lr"] == pytest.approx(10 * lr)
    assert {g["weight_decay"] for g in groups.values()} == {wd}


def test_lr_scale_applies_at_the_current_schedule_position():
    cfg = load_config("configs/demo.yaml", ["classifier.epochs=1"])
    model = parallel.wrap(
        create_classifier("small38", 4),
        cfg.classifier,
        device=torch.device("cpu"),
        plan=batching.plan_batches(cfg.classifier, 1),
        total_steps=10,
    )
    for _ in range(4):
        model.optimizer.step()  # no gradients: moves nothing, but keeps the step order torch expects
        model.scheduler.step()
    before = [g["lr"] for g in model.optimizer.param_groups]
    model.set_lr_scale(0.5)
    assert [g["lr"] for g in model.optimizer.param_groups] == pytest.approx([lr * 0.5 for lr in before])
    model.scheduler.step()
    poly = (1 - 5 / 10) ** cfg.classifier.poly_power
    assert model.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.classifier.lr * 0.5 * poly)


def test_adamw_takes_the_same_groups_and_sgd_stays_the_default():
    cfg = load_config("configs/luad.yaml", ["classifier.optimizer=adamw", "classifier.momentum=0.8"])
    assert load_config("configs/luad.yaml").classifier.optimizer == "sgd"
    model = create_classifier("small38", 4)
    adamw = parallel.create_optimizer(model.param_groups(), cfg.classifier)
    sgd = parallel.create_optimizer(model.param_groups(), load_config("configs/luad.yaml").classifier)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    assert {n: (g["lr"], g["weight_decay"]) for n, g in _groups(adamw).items()} == {
        n: (g["lr"], g["weight_decay"]) for n, g in _groups(sgd).items()
    }
    assert adamw.defaults["betas"] == (0.8, 0.999)
    with pytest.raises(ValueError, match="segmenter.optimizer"):
        load_config("configs/luad.yaml", ["segmenter.optimizer=adam"])
