"""Exact-label mosaics for stage 3: borders between tissues with pixel labels that are right.

A patch whose image-level label names one tissue has an exact pseudo mask: that tissue on
every pixel the white channel left (stage 2's argmax runs over the labelled classes only).
A patch with several tissues has a mask only as good as its CAMs, and the segmenter learns
their errors with it, above all near the borders between tissues. So, within each rank's
micro batch (the loss's input), a random smooth region of one single-tissue patch is pasted
into another single-tissue patch of a different tissue, image and masks alike: a two-tissue
patch whose labels are exact at every pixel, borders included. Patches that mix tissues
pass through untouched.

Which patches are single-tissue is read off their masks (one non-white value over every
layer), so the mixing needs nothing from the loaders and works the same after either.
Every draw comes from the global torch RNG, which the checkpoints save per rank: a resumed
run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def single_tissue_classes(masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B,) the one tissue class of each patch's masks (B,L,H,W), -1 where there are none or several."""
    flat = masks.reshape(masks.shape[0], -1).long()
    valid = flat != ignore_index
    low = torch.where(valid, flat, torch.full_like(flat, ignore_index)).amin(1)
    high = torch.where(valid, flat, torch.full_like(flat, -1)).amax(1)
    single = valid.any(1) & (low == high)
    return torch.where(single, high, torch.full_like(high, -1))


def smooth_regions(count: int, height: int, width: int, grid: int = 3) -> torch.Tensor:
    """(count, H, W) bool: blobs of uniform noise on a (grid+1)^2 lattice upsampled bicubically
    (smooth, organic borders), each thresholded at its own random quantile so that it covers
    25-75 % of the patch."""
    noise = torch.rand(count, 1, grid + 1, grid + 1)
    field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)[:, 0]
    share = 0.25 + 0.5 * torch.rand(count)
    ordered = field.reshape(count, -1).sort(dim=1).values
    rank = ((1.0 - share) * (ordered.shape[1] - 1)).long()
    cut = ordered.gather(1, rank[:, None])
    return field > cut[:, :, None]


def draw_pairs(tissue: torch.Tensor, prob: float) -> list[tuple[int, int]]:
    """(target, donor) pairs: each single-tissue patch (``tissue`` >= 0) is a target with
    probability ``prob``, its donor a random single-tissue patch of another class."""
    batch = tissue.shape[0]
    draws = torch.rand(batch)
    picks = torch.rand(batch, batch)
    pairs = []
    for target in range(batch):
        eligible = (tissue >= 0) & (tissue != tissue[target])
        if tissue[target] < 0 or draws[target] >= prob or not eligible.any():
            continue
        pairs.append((target, int(torch.where(eligible, picks[target], -1.0).argmax())))
    return pairs


def paste(images: torch.Tensor, pairs: list[tuple[int, int]], regions: torch.Tensor) -> torch.Tensor:
    """A copy of ``images`` (B,K,H,W) with regions (N,H,W) of each pair's donor in its target.
    Donors are read from the input: a donor that is also a target gives its own content."""
    t = torch.tensor([p[0] for p in pairs], device=images.device)
    d = torch.tensor([p[1] for p in pairs], device=images.device)
    out = images.clone()
    out[t] = torch.where(regions[:, None], images[d], images[t])
    return out


def mix_single_tissue(
    images: torch.Tensor, masks: torch.Tensor, ignore_index: int, prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a smooth region of another single-tissue patch of a different class into
    each single-tissue patch, with probability ``prob`` per patch, masks alike. images
    (B,3,H,W), masks (B,L,H,W); returns new tensors (the inputs are left as they are)."""
    if prob <= 0:
        return images, masks
    pairs = draw_pairs(single_tissue_classes(masks, ignore_index).cpu(), prob)
    if not pairs:
        return images, masks
    regions = smooth_regions(len(pairs), images.shape[-2], images.shape[-1]).to(images.device)
    return paste(images, pairs, regions), paste(masks, pairs, regions)
