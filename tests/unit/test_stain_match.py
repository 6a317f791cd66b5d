"""Stain matching of whole sets (mlps_dist/core/stain_match.py): H&E-like images built from
known optical densities, so what matching must undo is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from mlps_dist.core.stain import StainNormaliser, fit_reference, from_optical_density, optical_density
from mlps_dist.core.stain_match import (
    MAX_GAIN,
    OpticalDensityMatcher,
    SetStain,
    create_stain,
    fit_od_match,
    for_set,
    mean_tissue_od,
    set_pixels,
)

H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])


def tissue_od(seed: int, size: int = 64, nuclei: int = 20) -> np.ndarray:
    """Optical density of nuclei on eosin stroma with a disc of glass (density 0)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = np.zeros((size, size))
    for _ in range(nuclei):
        cy, cx = rng.uniform(0, size, 2)
        h += 1.2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(2, 4) ** 2))
    e = 0.5 + 0.3 * rng.random((size, size))
    glass = (yy - size * 0.8) ** 2 + (xx - size * 0.8) ** 2 < (size * 0.15) ** 2
    h[glass], e[glass] = 0.0, 0.0
    return h[..., None] * H + e[..., None] * E


def lab(seeds, amount: float = 1.0) -> list[np.ndarray]:
    """One lab's images: the same tissue at ``amount`` x the optical density."""
    return [from_optical_density(amount * tissue_od(s)) for s in seeds]


def matched(reference_images, images, scope="set") -> list[np.ndarray]:
    stain = for_set(OpticalDensityMatcher(fit_od_match(reference_images)), scope, images)
    return [stain(rgb) for rgb in images]


def test_the_training_set_is_its_own_reference_and_stays_byte_for_byte():
    train = lab(range(6))
    assert all(np.array_equal(a, b) for a, b in zip(matched(train, train), train))


def test_a_paler_lab_is_mapped_back_onto_the_training_stain_and_glass_stays_white():
    train, test = lab(range(6)), lab(range(10, 16))
    pale = lab(range(10, 16), amount=0.5)
    out, same_lab = matched(train, pale), matched(train, test)
    before = np.mean([np.abs(p.astype(int) - t).mean() for p, t in zip(pale, test)])
    after = np.mean([np.abs(o.astype(int) - t).mean() for o, t in zip(out, same_lab)])
    assert before > 20 and after < 1.0  # the lab's stain strength no longer shows
    glass = optical_density(test[0]).max(axis=-1) < 0.01
    assert glass.any() and (out[0][glass] >= 254).all()


def test_a_pale_patch_keeps_its_paleness_in_its_set_but_not_on_its_own():
    """The reason for sets: a patch of pale tissue looks like a pale stain on its own."""
    train = lab(range(6))
    pale_tissue = from_optical_density(0.4 * tissue_od(20))
    images = [*lab(range(30, 35)), pale_tissue]
    in_set = matched(train, images)[-1]
    alone = matched(train, images, scope="image")[-1]
    ratio_set = mean_tissue_od(in_set) / mean_tissue_od(pale_tissue)
    ratio_alone = mean_tissue_od(alone) / mean_tissue_od(pale_tissue)
    assert np.all(ratio_set < 1.3) and np.all(ratio_alone > 2.0)  # the set: 1 pale patch in 6


def test_gain_is_clipped_and_glass_alone_is_left_as_it_is():
    images = set_pixels(lab(range(3)))
    for mean_od, gain in ((50.0, MAX_GAIN), (0.001, 1 / MAX_GAIN)):
        matcher = OpticalDensityMatcher({"method": "od_match", "mean_od": [mean_od] * 3, "max_gain": MAX_GAIN})
        assert np.allclose(matcher.estimate(images)["gain"], gain)
    glass = np.full((32, 32, 3), 252, np.uint8)
    assert matcher.estimate(glass) is None and np.array_equal(matcher(glass), glass)
    pale = lab([5], amount=0.5)[0]
    assert np.array_equal(SetStain(matcher, None)(pale), pale)  # a set without tissue: nothing to match


def test_stored_references_make_their_own_kind_and_only_sets_refuse_per_image_fitting():
    images = lab(range(4))
    assert create_stain(None) is None
    assert isinstance(create_stain(fit_od_match(images)), OpticalDensityMatcher)
    macenko = create_stain(fit_reference("macenko", images))
    assert isinstance(macenko, StainNormaliser) and macenko.default_scope == "image"
    assert for_set(macenko, "image", images) is macenko
    with pytest.raises(ValueError, match="unknown stain method 'od_match'"):
        fit_reference("od_match", images)
    with pytest.raises(ValueError, match="data.stain.method"):
        fit_od_match([np.full((16, 16, 3), 255, np.uint8)])
    with pytest.raises(ValueError, match="stain scope"):
        for_set(macenko, "slide", images)
