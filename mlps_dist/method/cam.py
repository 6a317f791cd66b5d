"""Batched multi-layer Grad-CAM -> pseudo masks (stage 2 of MLPS).

For every image and every class c, at every layer l of ``masks.layers``::

    w_k   = mean over positions of d logit_c / d f_k          (f = features at layer l)
    cam_c = sum_k w_k f_k                                      (no ReLU, as the public MLPS code)
    cam   = bilinear upsampling to the patch size (align_corners=False, the cv2.resize rule)
    norm  = (cam - min) / (max - min), min/max taken jointly over all C classes of the image
    mask  = argmax over the present classes (first index wins ties)
    mask  = C (ignore) on white background: grey > threshold in 4-connected components
            of at least ``min_size`` pixels (LUAD; off for BCSS)

One deliberate difference from the public code, which zeroes absent classes before the
argmax: where every present class scores exactly 0 (at the joint minimum, e.g. flat zero
regions of ReLU features) numpy's argmax then picks class 0 even when the patch does not
contain it. Here absent classes can never win; everywhere else the masks are the same.

Otherwise this reproduces the public code (``tool/infer_fun.create_pseudo_mask`` + ``tool/gradcam.py``),
which spends one forward and one backward pass per image, class and layer. Here one forward
serves all layers and one vmapped backward (``is_grads_batched``) yields the gradients of all
C class logits at all layers for the whole batch: samples are independent in eval mode, so
d(sum_b logit_bc)/d f_b = d logit_bc / d f_b. The slow per-image path lives in
tests/reference_cam.py and the tests prove both give the same masks.

The classifier runs in eval mode with PDA off (the public stage-2 network has no attention
module); dropout is the identity in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R 601 luma in 14-bit fixed point with rounding: the integer rule cv2.cvtColor(RGB2GRAY)
# applies to uint8 images, so "grey > 200" selects exactly the pixels the public code selects.
_GREY_WEIGHTS = (4899, 9617, 1868)
_GREY_SHIFT = 14


def head_layer(model) -> str:
    """The CAM layer the classifier head reads (the last of ``model.cam_layers``, bn7)."""
    return list(model.cam_layers)[-1]


def check_layers(model, layers: list[str]) -> None:
    unknown = [layer for layer in layers if layer not in model.cam_layers]
    if unknown:
        raise ValueError(
            f"masks.layers names {unknown}, which this classifier does not expose; choose from {list(model.cam_layers)}"
        )


def prepare_model(model) -> None:
    """Eval mode (BatchNorm statistics frozen, dropout off), PDA off, no weight gradients."""
    model.eval()
    if hasattr(model, "pda_gamma"):
        model.pda_gamma = None
    model.requires_grad_(False)


def gradcams(model, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Raw Grad-CAMs at feature resolution: ``{layer: (B, C, h, w)}`` for every class."""
    with torch.enable_grad():
        # The input carries requires_grad so features are in the graph even with frozen weights.
        feats = model.forward_features(images.detach().requires_grad_(True))
        logits = model.logits_from_features(feats[head_layer(model)])
        batch, classes = logits.shape
        seeds = torch.eye(classes, dtype=logits.dtype, device=logits.device)
        seeds = seeds.unsqueeze(1).expand(classes, batch, classes)
        grads = torch.autograd.grad(
            logits, [feats[layer] for layer in layers], grad_outputs=seeds, is_grads_batched=True
        )
    out = {}
    for layer, grad in zip(layers, grads):
        weights = grad.mean(dim=(-2, -1))  # (C, B, K)
        out[layer] = torch.einsum("cbk,bkhw->bchw", weights, feats[layer].detach())
    return out


def tta_gradcams(
    model,
    images: torch.Tensor,
    layers: list[str],
    flip: bool = False,
    scales: tuple[float, ...] = (1.0,),
    size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Grad-CAMs upsampled to ``size`` (default: the input's), summed over test-time variants
    (each scale, and its horizontal mirror when ``flip``), like the public inference."""
    size = tuple(size or images.shape[-2:])
    total: dict[str, torch.Tensor] = {}
    for scale in scales:
        scaled = (
            images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        for mirrored in [False, True] if flip else [False]:
            view = scaled.flip(-1) if mirrored else scaled
            for layer, cam in gradcams(model, view, layers).items():
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
                cam = cam.flip(-1) if mirrored else cam
                total[layer] = cam if layer not in total else total[layer] + cam
    return total


def normalise_joint(cams: torch.Tensor) -> torch.Tensor:
    """Min-max over all classes and pixels of each image; a constant CAM maps to zeros
    (the public code would divide by zero there)."""
    flat = cams.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1, 1) - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (cams - low) / safe, torch.zeros_like(cams))


def grey_levels(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, H, W) int32 grey levels, bit-exact with cv2's RGB2GRAY."""
    rgb = rgb.to(torch.int32)
    weighted = rgb[:, 0] * _GREY_WEIGHTS[0] + rgb[:, 1] * _GREY_WEIGHTS[1] + rgb[:, 2] * _GREY_WEIGHTS[2]
    return (weighted + (1 << (_GREY_SHIFT - 1))) >> _GREY_SHIFT


def component_sizes(region: torch.Tensor) -> torch.Tensor:
    """Size of the 4-connected component each pixel of ``region`` (B, H, W bool) belongs to
    (0 outside the region), for the whole batch at once.

    Label propagation: each pixel starts with its own id; every round takes the largest id
    among itself and its 4 neighbours, then jumps to the label its label points at (ids are
    pixel positions and only grow, so the jump stays inside the component and spreads the
    largest id along long thin components far faster than neighbour steps alone).
    Fixed point = one id (the largest) per component."""
    batch, height, width = region.shape
    outside = ~region
    ids = torch.arange(1, height * width + 1, device=region.device, dtype=torch.int32).view(1, height, width)
    labels = ids.expand(batch, height, width).masked_fill(outside, 0)
    while True:
        grown = labels.clone()  # in-place maxima with the 4 neighbours
        torch.maximum(grown[:, 1:], labels[:, :-1], out=grown[:, 1:])
        torch.maximum(grown[:, :-1], labels[:, 1:], out=grown[:, :-1])
        torch.maximum(grown[:, :, 1:], labels[:, :, :-1], out=grown[:, :, 1:])
        torch.maximum(grown[:, :, :-1], labels[:, :, 1:], out=grown[:, :, :-1])
        grown.masked_fill_(outside, 0)
        flat = grown.view(batch, -1)
        # pointer jump; pixels outside the region point at pixel 0 and are reset to 0 below
        new = flat.gather(1, (flat.long() - 1).clamp_(min=0)).view(batch, height, width).masked_fill_(outside, 0)
        if torch.equal(new, labels):
            break
        labels = new
    offsets = torch.arange(batch, device=region.device).view(batch, 1, 1) * (height * width + 1)
    flat = (labels.long() + offsets).flatten()
    counts = torch.bincount(flat, minlength=batch * (height * width + 1))
    return counts[flat].view(batch, height, width).masked_fill_(outside, 0)


def white_background(
    rgb: torch.Tensor, threshold: int = 200, min_size: int = 50, max_saturation: int = 0
) -> torch.Tensor:
    """(B, H, W) bool: pixels with grey > threshold in 4-connected white components of at
    least ``min_size`` pixels (skimage remove_small_objects(connectivity=1) semantics).
    ``max_saturation`` > 0 also requires max - min of R, G, B <= it (glass is near grey)."""
    white = grey_levels(rgb) > threshold
    if max_saturation > 0:
        channels = rgb.to(torch.int32)
        white &= (channels.amax(dim=1) - channels.amin(dim=1)) <= max_saturation
    if min_size <= 1 or not bool(white.any()):
        return white
    return white & (component_sizes(white) >= min_size)


def label_maps(norm_cams: torch.Tensor, labels: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """Gate by the patch label, argmax, paint the background with the ignore index C.
    Returns (B, H, W) uint8 class indices 0..C."""
    classes = norm_cams.shape[1]
    present = (labels > 0.5).view(*labels.shape, 1, 1)
    index = torch.where(present, norm_cams, torch.full_like(norm_cams, -torch.inf)).argmax(dim=1)
    if background is not None:
        index = torch.where(background, torch.full_like(index, classes), index)
    return index.to(torch.uint8)


@torch.no_grad()
def make_masks(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    rgb: torch.Tensor,
    layers: list[str],
    background: bool = True,
    threshold: int = 200,
    min_size: int = 50,
    max_saturation: int = 0,
    tta_flip: bool = False,
    tta_scales: tuple[float, ...] = (1.0,),
    refine: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Pseudo masks for a batch: ``{layer: (B, H, W) uint8}``.

    ``images`` normalised float (B, 3, H, W) on the model's device, ``labels`` (B, C) multi-hot,
    ``rgb`` the uint8 patch (B, 3, H, W) the white background is read from. ``refine``: the
    keyword arguments of cam_refine.refine_cams; the normalised CAMs are then refined at the
    model's input resolution and upsampled to the patch's."""
    rgb = rgb.to(images.device)
    white = white_background(rgb, threshold, min_size, max_saturation) if background else None
    labels = labels.to(images.device)
    patch = tuple(rgb.shape[-2:])
    size = tuple(images.shape[-2:]) if refine else patch
    cams = tta_gradcams(model, images, layers, flip=tta_flip, scales=tuple(tta_scales), size=size)
    norms = [normalise_joint(cams[layer]) for layer in layers]
    if refine:
        from mlps_dist.method.cam_refine import refine_cams

        colours = rgb if patch == size else F.interpolate(rgb.float(), size=size, mode="bilinear", align_corners=False)
        # Channels propagate independently: all layers in one call share the colour affinities.
        refined = refine_cams(torch.cat(norms, dim=1), colours, **refine)
        if patch != size:
            refined = F.interpolate(refined, size=patch, mode="bilinear", align_corners=False)
        norms = refined.split(labels.shape[1], dim=1)
    return {layer: label_maps(norm, labels, white) for layer, norm in zip(layers, norms)}


def make_masks_cfg(model, batch: dict, masks_cfg) -> dict[str, torch.Tensor]:
    """``make_masks`` with the settings of the ``masks`` config section."""
    bg = masks_cfg.background
    return make_masks(
        model,
        batch["image"],
        batch["labels"],
        batch["rgb"],
        list(masks_cfg.layers),
        background=bg.enabled,
        threshold=bg.threshold,
        min_size=bg.min_size,
        max_saturation=bg.max_saturation,
        tta_flip=masks_cfg.tta_flip,
        tta_scales=tuple(masks_cfg.tta_scales),
        refine=masks_cfg.refine.as_kwargs(),
    )
