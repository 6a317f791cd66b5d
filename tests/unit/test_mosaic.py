"""Stage-3 mosaics (mlps_dist/method/mosaic.py): which patches count as single-tissue, labels that
stay with their pixels, patches that mix tissues left alone, draws from the saved RNG."""

import pytest
import torch

from mlps_dist.method.mosaic import mix_single_tissue, single_tissue_classes, smooth_regions

WHITE = 4  # ignore index: four tissue classes


def batch_of(classes: list[int], size: int = 24, layers: int = 3):
    """Patches filled with one class each (image value = 10 * class + 1, so a pixel's source is
    readable off its value), a glass corner on every other patch."""
    count = len(classes)
    masks = torch.tensor(classes).view(count, 1, 1, 1).expand(count, layers, size, size).clone()
    masks[::2, :, :5, :5] = WHITE
    images = (10.0 * masks[:, :1].float() + 1.0).expand(count, 3, size, size).clone()
    return images, masks


def test_single_tissue_classes_read_off_the_masks():
    images, masks = batch_of([0, 1, 2, 3, 1])
    masks[1, 2, :, :3] = 3  # another class on one layer: mixed
    masks[3] = WHITE  # all glass: no tissue
    assert single_tissue_classes(masks, WHITE).tolist() == [0, -1, 2, -1, 1]


def test_mosaic_labels_stay_with_their_pixels_and_mixed_patches_pass_through():
    torch.manual_seed(0)
    images, masks = batch_of([0, 1, 2, 3, 0, 2, 1, 3])
    masks[7, :, 12:] = 0  # patch 7 mixes two tissues
    images[7] = 10.0 * masks[7, :1].float() + 1.0
    before_images, before_masks = images.clone(), masks.clone()
    mixed_images, mixed_masks = mix_single_tissue(images, masks, WHITE, prob=1.0)
    assert torch.equal(images, before_images) and torch.equal(masks, before_masks)  # inputs untouched
    # Every pixel keeps its label: the image value still encodes the mask value on every layer.
    for layer in range(masks.shape[1]):
        assert torch.equal(mixed_images[:, 0], 10.0 * mixed_masks[:, layer].float() + 1.0)
    assert torch.equal(mixed_images[7], images[7]) and torch.equal(mixed_masks[7], masks[7])
    for i in range(7):
        tissues = set(mixed_masks[i].unique().tolist()) - {WHITE}
        assert len(tissues) == 2, (i, tissues)  # its own tissue and a different donor's
        assert masks[i, 0, 10, 10].item() in tissues


def test_no_mosaic_without_a_donor_of_another_class_or_at_prob_zero():
    images, masks = batch_of([2, 2, 2, 2])
    out = mix_single_tissue(images, masks, WHITE, prob=1.0)
    assert torch.equal(out[0], images) and torch.equal(out[1], masks)
    images, masks = batch_of([0, 1, 2, 3])
    out = mix_single_tissue(images, masks, WHITE, prob=0.0)
    assert out[0] is images and out[1] is masks


def test_prob_sets_the_share_of_single_tissue_patches_mixed():
    torch.manual_seed(1)
    images, masks = batch_of([0, 1, 2, 3] * 50, size=8)
    _, mixed = mix_single_tissue(images, masks, WHITE, prob=0.3)
    share = (mixed != masks).flatten(1).any(1).float().mean().item()
    assert 0.2 < share < 0.4


def test_regions_are_smooth_blobs_of_a_quarter_to_three_quarters():
    torch.manual_seed(2)
    regions = smooth_regions(64, 48, 48)
    shares = regions.float().mean((1, 2))
    assert shares.min() >= 0.24 and shares.max() <= 0.76
    # Blobs, not salt and pepper: few label changes between neighbouring pixels.
    changes = (regions[:, 1:] != regions[:, :-1]).float().mean().item()
    assert changes < 0.1


@pytest.mark.parametrize("seed", [0, 5])
def test_draws_follow_the_global_rng(seed):
    """The checkpoints save the torch RNG per rank: the same state gives the same mosaics."""
    images, masks = batch_of([0, 1, 2, 3, 1, 0])
    torch.manual_seed(seed)
    first = mix_single_tissue(images, masks, WHITE, prob=0.7)
    torch.manual_seed(seed)
    second = mix_single_tissue(images, masks, WHITE, prob=0.7)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
