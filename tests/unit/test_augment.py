"""Per-stage augmentation: the draws, blur and HED stain jitter against written-out
references, masks untouched by them, torch and DALI agreeing with them on, and the
config keys (old shared keys rejected with the new names)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from loader_fixtures import RedChannelMasks, make_cfg

from mlps_dist.config import AugmentConfig, ConfigError, load_config
from mlps_dist.data.augment import AugParams, blur, hed, photometric, sample_params
from mlps_dist.data.loaders import create_train_loader
from mlps_dist.data.shards import open_split


def _image(seed=0, size=24):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (size, size + 5, 3)).astype(np.float32)


def test_draws_of_the_older_options_keep_their_meaning():
    """hflip/vflip/rot90/colour come from the first 7 uniforms of the stream, as before
    blur and HED existed; the new options draw after them."""
    cfg = AugmentConfig(hflip=True, vflip=True, rot90=False, color_jitter=0.2)
    for index in range(20):
        draws = np.random.default_rng(np.random.SeedSequence([3, 5, 1, index])).random(7)
        base = sample_params(cfg, 3, 5, index)
        assert base.hflip == (draws[0] < 0.5) and base.vflip == (draws[1] < 0.5) and not base.transpose
        assert base.gain == pytest.approx([1 + 0.2 * (2 * d - 1) for d in draws[3:6]])
        with_new = sample_params(
            AugmentConfig(color_jitter=0.2, blur_prob=0.5, hed_jitter=0.1, hed_shift=0.05), 3, 5, index
        )
        assert (with_new.hflip, with_new.vflip, with_new.gain, with_new.offset) == (
            base.hflip,
            base.vflip,
            base.gain,
            base.offset,
        )
        assert base.blur_sigma == 0 and not base.has_hed


def test_blur_and_hed_draws_follow_their_keys():
    cfg = AugmentConfig(blur_prob=0.5, blur_radius=1.0, hed_jitter=0.1, hed_shift=0.05)
    params = [sample_params(cfg, 0, 2, i) for i in range(400)]
    blurred = [p.blur_sigma for p in params if p.blur_sigma > 0]
    assert 140 < len(blurred) < 260 and max(blurred) <= 1.0
    assert all(p.blur_half == 3 for p in params)
    alphas = np.array([p.hed_alpha for p in params])
    betas = np.array([p.hed_beta for p in params])
    assert alphas.min() >= 0.9 and alphas.max() <= 1.1 and alphas.std() > 0.03
    assert np.abs(betas).max() <= 0.05 and betas.std() > 0.01
    assert params[7] == sample_params(cfg, 0, 2, 7) and params[7] != sample_params(cfg, 0, 3, 7)


def test_blur_matches_a_direct_gaussian_correlation_with_reflected_borders():
    img = _image(1)
    p = AugParams(blur_sigma=0.8, blur_half=3)
    h = 3
    taps = np.exp(-0.5 * (np.arange(-h, h + 1) / 0.8) ** 2)
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    padded = np.pad(img.astype(np.float64), ((h, h), (h, h), (0, 0)), mode="reflect")  # reflect-101
    ref = np.zeros(img.shape)
    for dy in range(2 * h + 1):
        for dx in range(2 * h + 1):
            ref += kernel[dy, dx] * padded[dy : dy + img.shape[0], dx : dx + img.shape[1]]
    assert np.allclose(blur(img, p), ref, atol=1e-3)
    assert blur(img, AugParams(blur_sigma=0.0, blur_half=3)) is img


def test_hed_jitter_is_rgb_to_stains_scale_shift_and_back():
    """Reference: skimage's rgb2hed/hed2rgb convention written out stain by stain."""
    img = _image(2)
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    hed_from_rgb = np.linalg.inv(rgb_from_hed)
    alpha, beta = (1.05, 0.93, 1.02), (0.01, -0.03, 0.0)
    od = np.log(np.maximum(img / 255.0, 1e-6)) / np.log(1e-6)
    stains = od @ hed_from_rgb
    stains = stains * np.array(alpha) + np.array(beta)
    ref = np.clip(np.exp(stains @ rgb_from_hed * np.log(1e-6)) * 255.0, 0, 255)
    out = hed(img, AugParams(hed_alpha=alpha, hed_beta=beta))
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=0.02)
    assert np.abs(out - img).max() > 1.0  # not the identity
    assert hed(img, AugParams()) is img  # off: untouched
    # identity parameters through the log/exp path: the same image up to float rounding
    assert np.allclose(hed(img, AugParams(hed_alpha=(1.0, 1.0, 1.0 + 1e-12))), img, atol=0.02)


def test_photometric_order_is_blur_then_hed_then_colour():
    img = _image(3)
    p = AugParams(
        gain=(1.1, 0.9, 1.0),
        offset=0.02,
        blur_sigma=0.7,
        blur_half=3,
        hed_alpha=(1.05, 1.0, 0.95),
        hed_beta=(0.02, 0.0, -0.01),
    )
    from mlps_dist.data.augment import colour

    assert np.array_equal(photometric(img, p), colour(hed(blur(img, p), p), p))


def test_stain_scale_and_hue_draws_follow_their_keys():
    """od_scale is log-uniform in [1/(1+s), 1+s] (halving as likely as doubling), stain_hue
    uniform in [-h, h]; both draw after the 15 older uniforms, which keep their meaning."""
    cfg = AugmentConfig(hed_jitter=0.1, od_scale=1.0, stain_hue=15.0)
    params = [sample_params(cfg, 0, 2, i) for i in range(400)]
    logs = np.log([p.od_scale for p in params])
    hues = np.array([p.hue_deg for p in params])
    assert logs.min() >= -math.log(2) and logs.max() <= math.log(2) and abs(np.median(logs)) < 0.1
    assert (logs < -0.5).mean() > 0.1 and (logs > 0.5).mean() > 0.1  # both ends are reached
    assert np.abs(hues).max() <= 15 and hues.std() > 6
    older = [sample_params(AugmentConfig(hed_jitter=0.1), 0, 2, i) for i in range(400)]
    assert [p.hed_alpha for p in params] == [p.hed_alpha for p in older]
    assert all(p.od_scale == 1.0 and p.hue_deg == 0.0 for p in older)


def test_od_scale_multiplies_every_stain_and_hue_turns_about_the_grey_axis():
    img = _image(4).clip(20, 235)  # away from black and white, where clipping would bend the map
    od = -np.log(img / 255.0)
    scaled = hed(img, AugParams(od_scale=0.5))
    assert np.allclose(-np.log(np.maximum(scaled, 1e-3) / 255.0), 0.5 * od, atol=2e-3)
    out = hed(img, AugParams(hue_deg=12.0))
    inside = ((out > 0.5) & (out < 254.5)).all(-1)  # a turn can push a channel past white: clipped there
    assert inside.mean() > 0.5
    od, turned = od[inside], -np.log(out[inside] / 255.0)
    assert np.allclose(np.linalg.norm(turned, axis=-1), np.linalg.norm(od, axis=-1), rtol=1e-3)
    grey = np.ones(3) / math.sqrt(3)
    assert np.allclose(turned @ grey, od @ grey, atol=2e-3)  # the grey part stays: lightness is kept
    flat_od, flat_turned = od - np.outer(od @ grey, grey), turned - np.outer(turned @ grey, grey)
    cos = (flat_od * flat_turned).sum(-1) / (np.linalg.norm(flat_od, axis=-1) * np.linalg.norm(flat_turned, axis=-1))
    assert np.allclose(np.degrees(np.arccos(np.clip(cos, -1, 1))), 12.0, atol=0.2)
    assert hed(img, AugParams(od_scale=1.0, hue_deg=0.0)) is img


PHOTOMETRIC = dict(
    rot90=True,
    color_jitter=0.1,
    blur_prob=0.5,
    blur_radius=1.0,
    hed_jitter=0.1,
    hed_shift=0.05,
    od_scale=0.5,
    stain_hue=10.0,
)


def test_masks_get_the_geometry_only(tiny_shards):
    reader = open_split(tiny_shards, "train")
    out = {}
    for name, keys in {"plain": dict(rot90=True, blur_prob=0.0), "photometric": PHOTOMETRIC}.items():
        cfg = make_cfg(tiny_shards, "torch", **keys)
        out[name] = next(
            iter(
                create_train_loader(
                    cfg,
                    reader,
                    batch_size=8,
                    epoch=1,
                    rank=0,
                    world=1,
                    device="cpu",
                    pseudo_masks=RedChannelMasks(reader),
                )
            )
        )
    assert torch.equal(out["plain"]["masks"], out["photometric"]["masks"])
    assert not torch.allclose(out["plain"]["image"], out["photometric"]["image"], atol=1e-2)


def test_stage_sections_are_used_by_their_stage(tiny_shards):
    reader = open_split(tiny_shards, "train")
    cfg = make_cfg(tiny_shards, "torch")
    cfg.classifier.augment = AugmentConfig(hflip=False, vflip=False)
    cfg.segmenter.augment = AugmentConfig(hflip=False, vflip=False, hed_jitter=0.2)

    def first(**kw):
        return next(iter(create_train_loader(cfg, reader, batch_size=4, epoch=0, rank=0, world=1, device="cpu", **kw)))[
            "image"
        ]

    classifier = first()
    assert torch.equal(classifier, first(augment=cfg.classifier.augment))
    assert not torch.allclose(classifier, first(augment=cfg.segmenter.augment), atol=1e-2)
    assert torch.equal(first(pseudo_masks=RedChannelMasks(reader)), first(augment=cfg.segmenter.augment))


def test_torch_and_dali_agree_with_blur_and_hed_on(tiny_shards):
    pytest.importorskip("nvidia.dali")
    reader = open_split(tiny_shards, "train")
    out = {}
    for backend in ("torch", "dali"):
        cfg = make_cfg(tiny_shards, backend, **PHOTOMETRIC)
        out[backend] = list(
            create_train_loader(
                cfg, reader, batch_size=4, epoch=3, rank=0, world=2, device="cpu", pseudo_masks=RedChannelMasks(reader)
            )
        )
    assert len(out["torch"]) == len(out["dali"]) == 4
    for a, b in zip(out["torch"], out["dali"]):
        assert a["key"] == b["key"] and torch.equal(a["masks"], b["masks"])
        # float32 log/exp and 2-D vs separable blur differ by rounding only (measured: 2e-6)
        assert (a["image"] - b["image"]).abs().max() < 1e-4


def _write(tmp_path, values) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize("old", ["hflip", "vflip", "rot90", "color_jitter"])
def test_augmentation_is_not_a_data_key(tmp_path, old):
    """Augmentation is set per stage (classifier.augment, segmenter.augment): data.<op> is an
    unknown key, named with the file it is in."""
    config = _write(tmp_path, {"data": {old: True if old != "color_jitter" else 0.1}})
    with pytest.raises(ConfigError, match=rf"{config}.*unknown key 'data.{old}'"):
        load_config(config)
    with pytest.raises(ConfigError, match=rf"unknown key 'data.{old}'"):
        load_config(None, [f"data.{old}=1"])


@pytest.mark.parametrize(
    "key,value",
    [
        ("segmenter.augment.blur_prob", 1.5),
        ("classifier.augment.hed_jitter", 1.0),
        ("segmenter.augment.hed_shift", -0.1),
        ("classifier.augment.od_scale", -0.5),
        ("segmenter.augment.stain_hue", 90),
        ("classifier.augment.blur_radius", 0),
        ("segmenter.augment.color_jitter", 1.0),
        ("segmenter.multi_grid", "[1, 2]"),
    ],
)
def test_bad_augment_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


def test_shipped_configs_set_the_public_and_demo_augmentation():
    for name in ("luad", "bcss"):
        cfg = load_config(f"configs/{name}.yaml")
        c, s = cfg.classifier.augment, cfg.segmenter.augment
        assert (c.hflip, c.vflip, c.rot90, c.color_jitter, c.blur_prob, c.hed_jitter, c.hed_shift) == (
            True,
            True,
            False,
            0.0,
            0.0,
            0.0,
            0.0,
        )
        assert (s.hflip, s.vflip, s.rot90, s.color_jitter, s.blur_prob, s.blur_radius, s.hed_jitter) == (
            True,
            False,
            False,
            0.0,
            0.5,
            1.0,
            0.0,
        )
        assert cfg.segmenter.loss_batch_average and cfg.segmenter.multi_grid == [1, 2, 4]
    demo = load_config("configs/demo.yaml")
    for a in (demo.classifier.augment, demo.segmenter.augment):
        assert (a.hflip, a.vflip, a.rot90, a.color_jitter, a.blur_prob, a.hed_jitter) == (True, True, True, 0.1, 0, 0)
    assert not demo.segmenter.loss_batch_average
    assert demo.segmenter.optimizer == "adamw" and math.isclose(demo.segmenter.lr, 0.001)
    for name in ("luad", "bcss"):  # the public recipe: SGD in both stages, no CAM refinement
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.classifier.optimizer == cfg.segmenter.optimizer == "sgd" and not cfg.masks.refine.enabled
        assert cfg.classifier.ema_decay == cfg.segmenter.ema_decay == 0 and cfg.data.max_downscale == 0
