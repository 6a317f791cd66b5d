"""Progressive Dropout Attention on hand-built CAM inputs, and when it applies."""

import torch

from mlps_dist.models import create_classifier
from mlps_dist.models.classifier import dropped_cam_attention, progressive_dropout_attention


def _identity_head(num_classes: int) -> torch.Tensor:
    """Head whose class-c CAM is exactly feature channel c."""
    return torch.eye(num_classes).view(num_classes, num_classes, 1, 1)


def test_drops_pixels_above_gamma_times_max_and_averages_over_all_classes():
    num_classes = 3  # deliberately not 4
    cams = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 10.0]],  # max 10: gamma*max = 7 -> 10 dropped
            [[4.0, 4.0], [0.5, 0.0]],  # max 4: 2.8 -> both 4s dropped
            [[-1.0, 6.0], [6.0, 7.0]],  # relu -> [0,6,6,7], max 7: 4.9 -> 6,6,7 dropped
        ]
    ).unsqueeze(0)
    features = cams.clone()
    out = progressive_dropout_attention(features, _identity_head(num_classes), gamma=0.7)

    relu = cams.clamp(min=0)
    dropped = relu.clone()
    for c in range(num_classes):
        dropped[0, c][relu[0, c] > 0.7 * relu[0, c].max()] = 0
    attention = dropped.sum(dim=1, keepdim=True) / num_classes
    assert torch.allclose(out, features * attention)
    # spot values: pixel (0,0): (1 + 0 + 0)/3; pixel (1,1): (0 + 0 + 0)/3
    assert torch.isclose(attention[0, 0, 0, 0], torch.tensor(1 / 3))
    assert attention[0, 0, 1, 1] == 0


def test_gamma_one_keeps_everything_and_max_is_per_image():
    torch.manual_seed(0)
    features = torch.rand(2, 5, 4, 4)
    features[1] *= 100  # a different scale in the second image must not affect the first
    head = _identity_head(5)
    out = progressive_dropout_attention(features, head, gamma=1.0)
    expected = features * features.mean(dim=1, keepdim=True)
    assert torch.allclose(out, expected)
    alone = progressive_dropout_attention(features[:1], head, gamma=0.5)
    both = progressive_dropout_attention(features, head, gamma=0.5)
    assert torch.allclose(alone[0], both[0])


def test_head_with_more_features_than_classes():
    torch.manual_seed(1)
    features = torch.rand(1, 6, 3, 3)
    head = torch.randn(2, 6, 1, 1)
    out = progressive_dropout_attention(features, head, gamma=0.8)
    cams = torch.relu(torch.einsum("bkhw,ck->bchw", features, head[:, :, 0, 0]))
    peak = cams.amax(dim=(2, 3), keepdim=True)
    att = torch.where(cams > 0.8 * peak, 0.0, cams).mean(dim=1, keepdim=True)
    assert torch.allclose(out, features * att, atol=1e-6)


def test_pda_applies_only_in_training_with_a_gamma():
    torch.manual_seed(0)
    model = create_classifier("small38", num_classes=3)
    model.dropout7.p = 0.0  # isolate PDA from the dropout that follows it
    model.backbone.eval()  # deterministic features (BN running stats, no block dropout)
    x = torch.randn(2, 3, 32, 32)
    model.head.train()
    model.training = True

    model.pda_gamma = None
    off = model(x)
    feats = model.forward_features(x)["bn7"]
    assert torch.allclose(off, model.logits_from_features(feats), atol=1e-5)

    model.pda_gamma = 0.7
    for mode in ("public", "normalised"):
        model.pda_attention = mode
        on = model(x)
        expected = model.logits_from_features(progressive_dropout_attention(feats, model.head.weight, 0.7, mode))
        assert torch.allclose(on, expected, atol=1e-5)
        assert not torch.allclose(on, off)

    model.eval()  # eval: PDA never applies, whatever gamma says
    assert torch.allclose(model(x), model.logits_from_features(model.forward_features(x)["bn7"]), atol=1e-5)


def test_pda_gradient_reaches_head_through_attention():
    features = torch.rand(1, 4, 3, 3)
    head = torch.randn(2, 4, 1, 1, requires_grad=True)
    progressive_dropout_attention(features, head, gamma=0.9).sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_normalised_attention_has_the_public_shape_with_spatial_mean_one():
    torch.manual_seed(2)
    features = torch.rand(3, 6, 5, 5)
    head = torch.randn(4, 6, 1, 1)
    public_map = dropped_cam_attention(features, head, 0.8)
    assert torch.allclose(progressive_dropout_attention(features, head, 0.8, "public"), features * public_map)
    normalised = progressive_dropout_attention(features, head, 0.8, "normalised")
    expected_map = public_map / public_map.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(normalised, features * expected_map, atol=1e-6)
    assert torch.allclose((normalised / features).mean(dim=(2, 3)), torch.ones(3, 6), atol=1e-5)


def test_normalised_attention_ignores_the_head_scale_and_passes_no_gradient_through_the_map():
    torch.manual_seed(3)
    features = torch.rand(2, 6, 4, 4)
    head = torch.randn(3, 6, 1, 1)
    small = progressive_dropout_attention(features, head, 0.9, "normalised")
    large = progressive_dropout_attention(features, head * 100, 0.9, "normalised")
    assert torch.allclose(small, large, atol=1e-5)  # the public map would grow 100x
    assert torch.allclose(
        progressive_dropout_attention(features, head * 100, 0.9, "public"),
        100 * progressive_dropout_attention(features, head, 0.9, "public"),
        rtol=1e-4,
    )
    weights = head.clone().requires_grad_(True)
    assert not progressive_dropout_attention(features, weights, 0.9, "normalised").requires_grad
    inputs = features.clone().requires_grad_(True)
    progressive_dropout_attention(inputs, weights, 0.9, "normalised").sum().backward()
    assert torch.allclose(inputs.grad, small / features)  # d(f x A)/df = A: the map is a constant


def test_normalised_attention_keeps_features_where_every_cam_is_zero():
    features = torch.rand(1, 3, 4, 4)
    head = -torch.ones(2, 3, 1, 1)  # relu(negative) = 0 everywhere
    assert torch.equal(progressive_dropout_attention(features, head, 0.7, "normalised"), features)
