"""Batched Grad-CAM pseudo masks against the slow per-image reference (tests/support/reference_cam.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from reference_cam import background_reference, reference_masks

from mlps_dist.data.shards import decode_labels, open_split
from mlps_dist.method import cam
from mlps_dist.models import create_classifier

LAYERS = ["b4_5", "b5_2", "bn7"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_classifier("small38", 4)
    # Non-trivial BatchNorm statistics so that eval-mode features are not a bare affine chain.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    cam.prepare_model(net)
    return net


@pytest.fixture(scope="module")
def patches(tiny_shards):
    """Four train patches of the tiny shards (single- and multi-label); the first gets a
    12x12 white square (kept as background) and a 3x3 white speck in a dark ring (below
    min_size, so not background)."""
    reader = open_split(tiny_shards, "train")
    rgb, labels = [], []
    for i in range(4):
        members = reader.read(i)
        rgb.append(np.array(Image.open(io.BytesIO(members["png"])).convert("RGB")))
        labels.append(decode_labels(members["labels"]))
    rgb = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous()
    rgb[0, :, 4:16, 4:16] = 255
    rgb[0, :, 28:35, 28:35] = 60  # dark ring: the speck is its own component
    rgb[0, :, 30:33, 30:33] = 250
    images = (rgb.float() / 255 - MEAN) / STD
    return images, torch.from_numpy(np.stack(labels)), rgb


def assert_same_masks(fast: torch.Tensor, ref: np.ndarray, scores: np.ndarray) -> None:
    """Equal, except where the reference's two best scores tie to float precision."""
    fast = fast.numpy()
    differ = fast != ref
    assert differ.mean() <= 1e-3, f"{int(differ.sum())} of {differ.size} pixels differ"
    if differ.any():
        b, y, x = np.nonzero(differ)
        top2 = np.sort(scores[b, :, y, x], axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] < 1e-5), "a differing pixel is not a near-tie"


def test_fast_path_equals_reference(model, patches):
    images, labels, rgb = patches
    fast = cam.make_masks(model, images, labels, rgb, LAYERS, background=True, threshold=200, min_size=50)
    ref, scores = reference_masks(model, images, labels, rgb, LAYERS, background=True, threshold=200, min_size=50)
    for layer in LAYERS:
        assert fast[layer].dtype == torch.uint8 and fast[layer].shape == images.shape[:1] + images.shape[2:]
        assert_same_masks(fast[layer], ref[layer], scores[layer])
    # Only present classes (or the ignore index) appear in a patch's masks.
    for layer in LAYERS:
        for i in range(images.shape[0]):
            allowed = set(np.nonzero(labels[i].numpy())[0].tolist()) | {4}
            assert set(np.unique(fast[layer][i].numpy()).tolist()) <= allowed


def test_layers_give_their_own_masks(model, patches):
    images, labels, rgb = patches
    fast = cam.make_masks(model, images, labels, rgb, LAYERS, background=False)
    multi = labels.sum(dim=1) > 1  # single-label patches are one class everywhere at every layer
    assert multi.any()
    assert not torch.equal(fast["b4_5"][multi], fast["bn7"][multi])
    assert not torch.equal(fast["b5_2"][multi], fast["bn7"][multi])
    # Asking for one layer gives that layer's masks, not those of another depth.
    alone = cam.make_masks(model, images, labels, rgb, ["b4_5"], background=False)
    assert torch.equal(alone["b4_5"], fast["b4_5"])


def test_bn7_gradcam_is_the_head_cam(model, patches):
    """GAP + linear head: Grad-CAM at bn7 = CAM from the head weights / (h*w)."""
    images = patches[0]
    gcam = cam.gradcams(model, images, ["bn7"])["bn7"]
    with torch.no_grad():
        feats = model.forward_features(images)["bn7"]
        head_cam = torch.nn.functional.conv2d(feats, model.head.weight)
    h, w = feats.shape[-2:]
    torch.testing.assert_close(gcam * (h * w), head_cam, rtol=1e-4, atol=1e-5)


def test_white_background_luad_vs_bcss(model, patches):
    images, labels, rgb = patches
    luad = cam.make_masks(model, images, labels, rgb, ["bn7"], background=True)["bn7"]
    bcss = cam.make_masks(model, images, labels, rgb, ["bn7"], background=False)["bn7"]
    assert (luad[0, 4:16, 4:16] == 4).all()  # the white square is ignore/background
    assert (luad[0, 30:33, 30:33] != 4).all()  # the speck is too small to count
    assert not (bcss == 4).any()  # BCSS: white tissue (fat) keeps its class
    outside = luad != 4
    assert torch.equal(luad[outside], bcss[outside])


def test_max_saturation_keeps_pale_tinted_tissue_out_of_the_background():
    """A neutral white square is glass; a pale pink square brighter than the grey threshold is
    tissue once max_saturation asks white to be near grey (it is glass without the limit)."""
    rgb = torch.full((1, 3, 40, 40), 120, dtype=torch.uint8)
    rgb[0, :, 2:14, 2:14] = torch.tensor([238, 236, 240], dtype=torch.uint8).view(3, 1, 1)  # glass, saturation 4
    rgb[0, :, 20:32, 20:32] = torch.tensor([242, 206, 230], dtype=torch.uint8).view(3, 1, 1)  # pale eosin, 36
    grey = cam.grey_levels(rgb)
    assert grey[0, 25, 25] > 200 and grey[0, 5, 5] > 200
    plain = cam.white_background(rgb, threshold=200, min_size=50)
    limited = cam.white_background(rgb, threshold=200, min_size=50, max_saturation=20)
    assert plain[0, 2:14, 2:14].all() and plain[0, 20:32, 20:32].all()
    assert limited[0, 2:14, 2:14].all() and not limited[0, 20:32, 20:32].any()
    assert int(limited.sum()) == 144


def test_masks_config_passes_max_saturation_on(model):
    from mlps_dist.config import Config

    rgb = torch.full((1, 3, 32, 32), 120, dtype=torch.uint8)
    rgb[0, :, 8:24, 8:24] = torch.tensor([242, 206, 230], dtype=torch.uint8).view(3, 1, 1)
    images = (rgb.float() / 255.0 - 0.5) / 0.25
    batch = {"image": images, "labels": torch.ones(1, 4), "rgb": rgb}
    cfg = Config().masks
    cfg.layers = ["bn7"]
    assert (cam.make_masks_cfg(model, batch, cfg)["bn7"][0, 8:24, 8:24] == 4).all()
    cfg.background.max_saturation = 20
    assert not (cam.make_masks_cfg(model, batch, cfg)["bn7"] == 4).any()


def test_component_sizes_match_flood_fill():
    gen = torch.Generator().manual_seed(1)
    region = torch.rand(3, 40, 40, generator=gen) > 0.45
    # A one-pixel-wide serpentine: one component along a ~820-pixel path, which plain
    # neighbour propagation would need ~800 rounds for.
    snake = np.zeros((40, 40), dtype=bool)
    snake[0::2, :] = True
    for row in range(1, 40, 2):
        snake[row, 39 if row % 4 == 1 else 0] = True
    region[2] = torch.from_numpy(snake)
    sizes = cam.component_sizes(region)
    for min_size in (1, 5, 50):
        for i in range(3):
            rgb = np.where(region[i].numpy()[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
            expect = background_reference(rgb, threshold=200, min_size=min_size)
            assert np.array_equal((sizes[i] >= min_size).numpy(), expect)


def test_grey_levels_follow_the_integer_rule():
    rgb = torch.tensor([[[[201]], [[200]], [[200]]], [[[255]], [[0]], [[0]]]], dtype=torch.uint8)
    grey = cam.grey_levels(rgb).flatten().tolist()
    assert grey == [(201 * 4899 + 200 * 9617 + 200 * 1868 + 8192) >> 14, (255 * 4899 + 8192) >> 14]


def test_label_gating_never_picks_an_absent_class():
    norm = torch.zeros(1, 3, 1, 3)
    norm[0, 2, 0, 1] = 0.5
    norm[0, 0, 0, 2] = 0.9  # absent class with the highest score
    labels = torch.tensor([[0.0, 1.0, 1.0]])
    out = cam.label_maps(norm, labels, None)
    # Pixel 0: all present classes tie at 0 -> the first present class, not absent class 0.
    assert out.tolist() == [[[1, 2, 1]]]


def test_flip_tta_is_mirror_symmetric(model, patches):
    images, labels, rgb = patches
    plain = cam.make_masks(model, images, labels, rgb, LAYERS, background=True, tta_flip=True)
    mirrored = cam.make_masks(model, images.flip(-1), labels, rgb.flip(-1), LAYERS, background=True, tta_flip=True)
    for layer in LAYERS:
        assert torch.equal(plain[layer].flip(-1), mirrored[layer])


def test_unknown_layer_is_refused(model):
    with pytest.raises(ValueError, match="masks.layers"):
        cam.check_layers(model, ["b4_5", "b9"])


def test_model_input_scale_gives_masks_at_the_patch_size(model, patches):
    """A classifier trained at data.image_size sees that scale in the mask pass too; the
    masks still come out at the stored patch size, with the white background read there."""
    from mlps_dist.data.augment import model_input

    images, labels, rgb = patches
    small = model_input(images, 32)
    assert small.shape[-2:] == (32, 32) and model_input(images, 0) is images
    assert model_input(images, images.shape[-1]) is images
    masks = cam.make_masks(model, small, labels, rgb, ["b5_2", "bn7"], background=True)
    for layer_masks in masks.values():
        assert layer_masks.shape == (4, *rgb.shape[-2:])
        assert bool((layer_masks[0, 4:16, 4:16] == 4).all())  # the white square, at full size
    # a same-size input gives exactly the masks of the unscaled path
    same = cam.make_masks(model, model_input(images, images.shape[-1]), labels, rgb, ["bn7"])
    assert torch.equal(same["bn7"], cam.make_masks(model, images, labels, rgb, ["bn7"])["bn7"])


def test_refinement_moves_a_blurred_cam_border_onto_the_colour_edge():
    """Two flat tissues, pink left of column 16 and purple right of it (with noise); the CAMs
    cross at column 22, as a blurry stride-8 CAM would. Propagation along colour affinities
    puts the argmax border on the colour edge; a constant CAM stays constant."""
    from mlps_dist.method.cam_refine import colour_affinities, refine_cams

    gen = torch.Generator().manual_seed(0)
    rgb = torch.empty(1, 3, 32, 32)
    rgb[..., :16] = torch.tensor([230.0, 150.0, 200.0]).view(1, 3, 1, 1)
    rgb[..., 16:] = torch.tensor([120.0, 70.0, 170.0]).view(1, 3, 1, 1)
    rgb = (rgb + 6 * torch.randn(rgb.shape, generator=gen)).clamp(0, 255).round()
    column = torch.arange(32.0).view(1, 1, 32).expand(1, 32, 32)
    cams = torch.stack([0.5 + (21.5 - column) / 32, torch.full((1, 32, 32), 0.5)], dim=1)  # class 0 up to column 21
    truth = torch.zeros(32, 32, dtype=torch.long)
    truth[:, 16:] = 1
    before = cams.argmax(dim=1)[0]
    settings = dict(iterations=40, dilations=(1, 2, 4, 8), colour_weight=0.1, blur_sigma=1.0)
    after = refine_cams(cams, rgb, **settings).argmax(dim=1)[0]
    assert (before != truth).sum() >= 32 * 5
    assert (after != truth).sum() <= 32
    affinity = colour_affinities(rgb, (1, 2), 0.1, 1.0)
    assert affinity.shape == (1, 16, 32, 32) and torch.allclose(affinity.sum(dim=1), torch.ones(1, 32, 32))
    flat = torch.full((1, 2, 32, 32), 0.25)
    assert torch.allclose(refine_cams(flat, rgb, **settings), flat)
    assert torch.equal(refine_cams(cams, rgb, **{**settings, "iterations": 0}), cams)


def test_refined_masks_come_at_the_patch_size_and_only_when_asked(model, patches):
    images, labels, rgb = patches
    plain = cam.make_masks(model, images, labels, rgb, LAYERS, background=True)
    small = torch.nn.functional.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    refine = dict(iterations=5, dilations=(1, 2), colour_weight=0.1, blur_sigma=1.0)
    refined = cam.make_masks(model, small, labels, rgb, LAYERS, background=True, refine=refine)
    for layer in LAYERS:
        assert refined[layer].shape == plain[layer].shape == rgb.shape[:1] + rgb.shape[-2:]
        white = plain[layer] == labels.shape[1]
        assert torch.equal(refined[layer] == labels.shape[1], white)  # background untouched
        present = labels.bool()[
            torch.arange(len(labels)).view(-1, 1, 1).expand_as(refined[layer]),
            refined[layer].long().clamp(max=labels.shape[1] - 1),
        ]
        assert present[~white].all()  # only classes of the patch label


def test_refine_settings_are_checked():
    from mlps_dist.config import ConfigError, load_config

    for section in ("masks", "evaluate"):
        for key, value in (("iterations", "-1"), ("dilations", "[]"), ("colour_weight", "0"), ("blur_sigma", "-1")):
            with pytest.raises(ConfigError, match=f"{section}.refine.{key}"):
                load_config("configs/demo.yaml", [f"{section}.refine.{key}={value}"])
