"""Tissue detection on fine maps: the cleanup runs at 8 um/px or coarser and the mask is
enlarged back, so a 1 um/px map gives the 8 um/px answer (to the block) in linear time."""

import numpy as np

from mlps_dist.slides.tissue import MORPHOLOGY_MPP, detect_tissue


def glass_with_tissue(side: int, mpp: float) -> np.ndarray:
    """Glass with a 0.8 mm tissue disc holding a 4 um crack, and 3 um dust specks."""
    rng = np.random.default_rng(0)
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) * mpp  # microns
    rgb = np.full((side, side, 3), 235, np.uint8) + rng.integers(0, 6, (side, side, 1), dtype=np.uint8)
    disc = (yy - 600) ** 2 + (xx - 600) ** 2 < 400**2
    disc &= np.abs(xx - 600) > 2  # a crack through the tissue, closed by the cleanup
    rgb[disc] = (170, 80, 160)
    for y, x in rng.uniform(100, 1100, (12, 2)):
        if (y - 600) ** 2 + (x - 600) ** 2 > 450**2:
            rgb[(yy - y) ** 2 + (xx - x) ** 2 < 3**2] = (150, 60, 150)
    return rgb


def test_a_fine_map_gets_the_coarse_cleanup_enlarged_back():
    fine = detect_tissue(glass_with_tissue(1200, 1.0), 1.0)
    assert fine.shape == (1200, 1200)
    yy, xx = np.mgrid[0:1200, 0:1200] + 0.5
    inside = (yy - 600) ** 2 + (xx - 600) ** 2 < 380**2
    outside = (yy - 600) ** 2 + (xx - 600) ** 2 > 420**2
    assert fine[inside].all()  # the crack is closed
    assert not fine[outside].any()  # the specks are gone
    # the mask is made of whole 8 x 8 blocks: the cleanup ran at 8 um/px
    factor = int(MORPHOLOGY_MPP)
    blocks = fine.reshape(1200 // factor, factor, 1200 // factor, factor)
    assert (blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3))).all()
    coarse = detect_tissue(glass_with_tissue(150, 8.0), 8.0)
    agree = (np.repeat(np.repeat(coarse, factor, 0), factor, 1) == fine).mean()
    assert agree > 0.99, agree


def test_a_map_at_half_the_cleanup_resolution_or_coarser_is_cleaned_as_it_is():
    # 4 um/px: no reduction, so the mask follows single pixels (not whole 2 x 2 blocks)
    mask = detect_tissue(glass_with_tissue(300, 4.0), 4.0)
    blocks = mask.reshape(150, 2, 150, 2)
    assert (blocks.all(axis=(1, 3)) != blocks.any(axis=(1, 3))).any()
