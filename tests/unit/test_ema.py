"""The weight average (mlps_dist/train/ema.py): its arithmetic, its ramp, buffers and state."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mlps_dist.train.ema import WeightAverage


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_the_average_follows_the_ramped_decay_and_leaves_the_model_alone():
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.99)
    expected = {k: v.clone().float() for k, v in start.items() if v.is_floating_point()}
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the BatchNorm statistics
        decay = min(0.99, (1 + step) / (10 + step))
        assert average.current_decay() == pytest.approx(decay)
        average.update(model)
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = decay * expected[key] + (1 - decay) * value.float()
    averaged = average.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-5)
        assert not torch.equal(averaged[key], model.state_dict()[key])  # an average, not a copy
    # Integer buffers are copied, not averaged.
    assert averaged["1.num_batches_tracked"].item() == model.state_dict()["1.num_batches_tracked"].item() == 30
    assert average.updates == 30
    assert not any(p.requires_grad for p in average.module.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_a_half_precision_model_is_averaged_in_float32():
    model = _model().half()
    average = WeightAverage(model, decay=0.999)
    assert all(p.dtype == torch.float32 for p in average.module.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)  # half weights arrive in the float32 average
    weight = average.module[0].weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, (model[0].weight.float() - 0.1), rtol=0, atol=2e-3)


def test_state_round_trip_continues_the_same_average():
    model = _model()
    one, two = WeightAverage(model, 0.9), WeightAverage(model, 0.9)
    for _ in range(5):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        one.update(model)
    two.load_state_dict(one.state_dict())
    assert two.updates == 5 and two.current_decay() == one.current_decay()
    with torch.no_grad():
        model[0].weight.add_(0.5)
    one.update(model)
    two.update(model)
    for (k, a), b in zip(one.module.state_dict().items(), two.module.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_out_of_range_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_model(), decay)
