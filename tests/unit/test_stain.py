"""Stain normalisation (mlps_dist/core/stain.py): H&E images built from known stain vectors and
amounts, so what normalisation must do is known exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlps_dist.core.stain import (
    MAX_SCALE,
    StainNormaliser,
    concentrations,
    fit_reference,
    from_optical_density,
    macenko_vectors,
    optical_density,
)

H = np.array([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11])
# another lab: bluer haematoxylin, pinker eosin
H2 = np.array([0.55, 0.78, 0.30])
E2 = np.array([0.20, 0.95, 0.25])


def unit(v):
    return v / np.linalg.norm(v)


def he_image(seed: int, h_vec=H, e_vec=E, amount: float = 1.0, size: int = 96, glass: bool = True) -> np.ndarray:
    """Nuclei (haematoxylin blobs) on eosin stroma, with a disc of glass in one corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h_amt = np.zeros((size, size))
    for _ in range(25):
        cy, cx = rng.uniform(0, size, 2)
        h_amt += 1.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(2, 4) ** 2))
    e_amt = 0.6 + 0.3 * rng.random((size, size))
    if glass:
        hole = (yy - size * 0.8) ** 2 + (xx - size * 0.8) ** 2 < (size * 0.15) ** 2
        h_amt[hole], e_amt[hole] = 0.0, 0.0
    od = amount * (h_amt[..., None] * unit(h_vec) + e_amt[..., None] * unit(e_vec))
    return from_optical_density(od)


def mean_abs(a, b) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_macenko_finds_the_stain_vectors_haematoxylin_first():
    od = optical_density(he_image(0)).reshape(-1, 3)
    tissue = od.max(axis=1) > 0.15
    vectors = macenko_vectors(od[tissue])
    assert vectors is not None
    assert vectors[0] @ unit(H) > 0.98 and vectors[1] @ unit(E) > 0.98


# Reinhard moves colour statistics only: it narrows a change of stain hues; Macenko maps the hues
# and moves the amounts by at most MAX_SCALE (half the optical density needs 2x).
@pytest.mark.parametrize("method, share", [("macenko", 0.55), ("reinhard", 0.8)])
def test_another_labs_stain_is_mapped_onto_the_training_reference(method, share):
    ref = fit_reference(method, [he_image(s) for s in range(6)])
    normalise = StainNormaliser(json.loads(json.dumps(ref)))  # as stored in RUN/classifier/stain.json
    for seed in (10, 11):
        ours = he_image(seed)
        theirs = he_image(seed, H2, E2, amount=0.5)  # half the optical density, other hues
        before = mean_abs(ours, theirs)
        after = mean_abs(normalise(ours), normalise(theirs))
        assert after < share * before, (method, before, after)


def test_macenko_undoes_a_change_of_stain_amount_within_its_limit_almost_exactly():
    normalise = StainNormaliser(fit_reference("macenko", [he_image(s) for s in range(6)]))
    ours = he_image(3)
    paler = from_optical_density(optical_density(ours) * 0.75)  # within MAX_SCALE: undone
    assert mean_abs(normalise(ours), normalise(paler)) < 3.0 < mean_abs(ours, paler)
    much_paler = from_optical_density(optical_density(ours) * 0.4)  # beyond it: only narrowed
    assert mean_abs(normalise(ours), normalise(much_paler)) < 0.7 * mean_abs(ours, much_paler)


def test_glass_stays_white_and_shape_and_dtype_are_kept():
    normalise = StainNormaliser(fit_reference("macenko", [he_image(s, H2, E2, 0.6) for s in range(4)]))
    image = he_image(5)
    out = normalise(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    glass = (image > 250).all(axis=2)
    assert glass.sum() > 100 and (out[glass] > 245).all()


def test_single_stain_image_keeps_the_reference_vectors_and_matches_the_amount():
    ref = fit_reference("macenko", [he_image(s) for s in range(4)])
    normalise = StainNormaliser(ref)
    size = 64
    rng = np.random.default_rng(1)
    eosin_only = from_optical_density((0.3 + 0.2 * rng.random((size, size)))[..., None] * unit(E))
    assert macenko_vectors(optical_density(eosin_only).reshape(-1, 3)) is None  # one direction: no pair
    out = normalise(eosin_only)
    amounts = concentrations(optical_density(out).reshape(-1, 3), np.asarray(ref["vectors"]))
    assert np.isfinite(out).all()
    before = concentrations(optical_density(eosin_only).reshape(-1, 3), np.asarray(ref["vectors"]))
    want = np.clip(ref["max"][1] / np.percentile(before[:, 1], 99), 1 / MAX_SCALE, MAX_SCALE)
    assert np.percentile(amounts[:, 1], 99) == pytest.approx(want * np.percentile(before[:, 1], 99), rel=0.1)


def test_an_image_without_tissue_is_returned_unchanged():
    normalise = StainNormaliser(fit_reference("reinhard", [he_image(s) for s in range(3)]))
    glass = np.full((32, 32, 3), 250, np.uint8)
    assert np.array_equal(normalise(glass), glass)


def test_fit_is_deterministic_and_refuses_images_without_tissue():
    images = [he_image(s) for s in range(5)]
    assert fit_reference("macenko", images) == fit_reference("macenko", list(images))
    with pytest.raises(ValueError, match="data.stain.method"):
        fit_reference("macenko", [np.full((32, 32, 3), 255, np.uint8)])
    with pytest.raises(ValueError, match="unknown stain method"):
        fit_reference("vahadane", images)
