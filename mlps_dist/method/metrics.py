"""Segmentation and multi-label classification metrics that add up across ranks.

Segmentation: one dataset-level confusion matrix over the C tissue classes (rows =
ground truth, columns = prediction). Ground-truth pixels equal to ``ignore_index``
(white / excluded) are not counted. Each rank counts its own samples; ``all_reduce()``
sums the integer counts, so the result is exactly what one process would compute.

    cm = ConfusionMatrix(num_classes=4, ignore_index=4, device=device)
    for batch in loader:
        cm.update(pred, batch["mask"])
    cm.all_reduce()
    scores = cm.compute()   # miou, fwiou, acc, macc, iou (per class)

Definitions follow the evaluation code published with the paper: IoU_c = TP / (TP + FP + FN);
a class absent from both prediction and ground truth has IoU nan and is left out of the
mIoU (nan-mean); FwIoU weights IoU by ground-truth pixel frequency; Acc = pixel accuracy;
mAcc = nan-mean of per-class recall.

Multi-label (stage 1 validation): ``multilabel_scores(probs, labels)`` or, to add up
across ranks, ``MultiLabelMeter``.

The stages and the export count with these through the evaluators of
``mlps_dist.method.evaluation`` (one loop: ``run_eval``).
"""

from __future__ import annotations

import math

import torch

from mlps_dist import dist


def nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count ``pred`` against ``target`` (integer tensors of the same shape)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} differs from "
                f"target shape {tuple(target.shape)}; upsample predictions to the mask size"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(
                "ConfusionMatrix.update: pred and target must be integer class indices "
                "(take argmax over the class dimension first)"
            )
        c = self.num_classes
        pred = pred.reshape(-1).to(self.counts.device, torch.int64)
        target = target.reshape(-1).to(self.counts.device, torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        # A value outside 0..C-1 is a bug upstream (wrong class count, wrong ignore index):
        # say so rather than fold it into some other class.
        bad_t = (target < 0) | (target >= c)
        if bool(bad_t.any()):
            raise ValueError(
                f"ConfusionMatrix.update: target holds value {int(target[bad_t][0])}, which is neither "
                f"a class 0..{c - 1} nor the ignore index {self.ignore_index}"
            )
        bad_p = (pred < 0) | (pred >= c)
        if bool(bad_p.any()):
            raise ValueError(
                f"ConfusionMatrix.update: prediction holds value {int(pred[bad_p][0])}, outside the classes 0..{c - 1}"
            )
        self.counts += torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks (in place); a no-op for a single process."""
        dist.all_reduce_sum(self.counts)
        return self

    def compute(self) -> dict:
        hist = self.counts.double().cpu()
        tp = hist.diag()
        gt = hist.sum(dim=1)  # pixels per ground-truth class
        predicted = hist.sum(dim=0)
        total = hist.sum()
        union = gt + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
        if total > 0:
            freq = gt / total
            present = freq > 0
            fwiou = float((freq[present] * iou[present]).sum())
            acc = float(tp.sum() / total)
        else:
            fwiou = acc = math.nan
        return {
            "miou": nanmean(iou),
            "fwiou": fwiou,
            "acc": acc,
            "macc": nanmean(recall),
            "iou": [float(v) for v in iou],
        }


# ---------------------------------------------------------------- multi-label


class MultiLabelMeter:
    """Per-class TP/FP/FN/TN counts plus exact-match count, summable across ranks."""

    def __init__(self, num_classes: int, threshold: float = 0.5, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.threshold = threshold
        # columns: tp, fp, fn, tn; the last row holds [exact matches, samples, 0, 0]
        self.counts = torch.zeros(num_classes + 1, 4, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"MultiLabelMeter.update: probs {tuple(probs.shape)} and labels {tuple(labels.shape)} "
                f"must both be (batch, {self.num_classes})"
            )
        pred = (probs > self.threshold).to(self.counts.device)
        truth = (labels > 0.5).to(self.counts.device)
        per_class = torch.stack(
            [(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0), (~pred & ~truth).sum(0)], dim=1
        )
        self.counts[:-1] += per_class
        self.counts[-1, 0] += (pred == truth).all(dim=1).sum()
        self.counts[-1, 1] += probs.shape[0]

    def all_reduce(self) -> MultiLabelMeter:
        dist.all_reduce_sum(self.counts)
        return self

    def compute(self) -> dict:
        """``acc``: exact-match accuracy (every label of a patch right); ``label_acc``:
        per-label accuracy; ``f1``: micro F1 (pooled over classes, stable on small sets);
        ``f1_macro``: mean of per-class F1 over classes that occur in labels or predictions."""
        c = self.counts.double().cpu()
        tp, fp, fn, tn = c[:-1, 0], c[:-1, 1], c[:-1, 2], c[:-1, 3]
        samples = c[-1, 1]
        denom = 2 * tp + fp + fn
        f1_class = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, math.nan))
        micro_denom = float(denom.sum())
        cells = float((tp + fp + fn + tn).sum())
        return {
            "acc": float(c[-1, 0] / samples) if samples > 0 else math.nan,
            "label_acc": float((tp + tn).sum() / cells) if cells > 0 else math.nan,
            "f1": float(2 * tp.sum() / micro_denom) if micro_denom > 0 else math.nan,
            "f1_macro": nanmean(f1_class),
            "f1_per_class": [float(v) for v in f1_class],
        }


def multilabel_scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """Scores of one set of (N, C) probabilities against (N, C) multi-hot labels; see
    ``MultiLabelMeter.compute`` for the keys."""
    meter = MultiLabelMeter(probs.shape[-1], threshold, device=probs.device)
    meter.update(probs, labels)
    return meter.compute()
