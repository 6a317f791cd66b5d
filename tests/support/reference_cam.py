"""The slow, obviously-correct pseudo-mask computation the fast path is checked against.

It follows the public MLPS stage-2 script step by step: one image at a time; for each layer
and each class its own forward pass, a backward pass of that class logit, channel weights
= spatial mean of the gradient, CAM = weighted channel sum; bilinear upsampling; min-max
over all classes jointly; absent classes excluded (-inf: the one deliberate
difference from the public code, which zeroes them and so lets them win exact ties); a white-background channel (grey
> 200
via cv2's integer rule, 4-connected components of >= min_size found by breadth-first
search) appended as channel C; argmax with the first maximum winning, as numpy does.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F


def grey_reference(rgb_hwc: np.ndarray) -> np.ndarray:
    r, g, b = (rgb_hwc[..., i].astype(np.int64) for i in range(3))
    return (r * 4899 + g * 9617 + b * 1868 + 8192) >> 14


def background_reference(rgb_hwc: np.ndarray, threshold: int, min_size: int) -> np.ndarray:
    white = grey_reference(rgb_hwc) > threshold
    height, width = white.shape
    keep = np.zeros_like(white)
    seen = np.zeros_like(white)
    for y in range(height):
        for x in range(width):
            if not white[y, x] or seen[y, x]:
                continue
            component, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                component.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < height and 0 <= nx < width and white[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(component) >= min_size:
                for cy, cx in component:
                    keep[cy, cx] = True
    return keep


def gradcam_one(model, image_chw: torch.Tensor, layer: str, class_index: int) -> np.ndarray:
    """One forward + one backward: the Grad-CAM of one class at one layer, patch-sized."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        feats = model.forward_features(image_chw.unsqueeze(0).clone().requires_grad_(True))
        target = feats[layer]
        target.retain_grad()
        logits = model.logits_from_features(feats[list(model.cam_layers)[-1]])
        logits[0, class_index].backward()
    # Like the public code: move to the CPU, then a plain loop over channels.
    weights = target.grad[0].mean(dim=(1, 2)).cpu().double().numpy()
    features = target[0].detach().cpu().double().numpy()
    cam = np.zeros(features.shape[1:], dtype=np.float64)
    for k, weight in enumerate(weights):
        cam += weight * features[k]
    cam = F.interpolate(
        torch.from_numpy(cam)[None, None].float(), size=image_chw.shape[1:], mode="bilinear", align_corners=False
    )[0, 0]
    return cam.double().numpy()


def reference_masks(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    rgb: torch.Tensor,
    layers: list[str],
    background: bool = True,
    threshold: int = 200,
    min_size: int = 50,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Returns ({layer: (B, H, W) uint8 masks}, {layer: (B, C+1, H, W) scores before argmax})."""
    model.eval()
    masks: dict[str, list] = {layer: [] for layer in layers}
    scores: dict[str, list] = {layer: [] for layer in layers}
    num_classes = labels.shape[1]
    for i in range(images.shape[0]):
        rgb_hwc = rgb[i].permute(1, 2, 0).numpy()
        bg = background_reference(rgb_hwc, threshold, min_size) if background else None
        for layer in layers:
            cams = np.stack([gradcam_one(model, images[i], layer, c) for c in range(num_classes)])
            span = cams.max() - cams.min()
            norm = (cams - cams.min()) / span if span > 0 else np.zeros_like(cams)
            for c in range(num_classes):
                if labels[i, c] < 0.5:
                    norm[c] = -np.inf  # the public code writes 0, which lets absent classes win ties
            bg_channel = np.where(bg, 1.000001, 0.0) if bg is not None else np.zeros(norm.shape[1:])
            stacked = np.concatenate([norm, bg_channel[None]], axis=0)
            masks[layer].append(np.argmax(stacked, axis=0).astype(np.uint8))
            scores[layer].append(stacked)
    return ({k: np.stack(v) for k, v in masks.items()}, {k: np.stack(v) for k, v in scores.items()})
