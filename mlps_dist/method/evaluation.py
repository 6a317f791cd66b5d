"""One evaluation loop with pluggable evaluators.

Every place that scores a model (stage-1 and stage-3 validation, the evaluate stage, the
pseudo-mask quality report, the export's self-check) runs the same loop: predict each
batch, hand batch and prediction to every evaluator, and ask each for its result:

    results = run_eval(loader, predict_fn, {"ungated": ConfusionEvaluator(4, ignore_index=4, key="ungated"),
                                            "skipped": SkippedCounter()})
    results["ungated"]["miou"], results["skipped"]

``predict_fn(batch)`` returns a dict of outputs; an evaluator reads the outputs it was told
to (``key``) and the ground truth from the batch. Each evaluator counts only what its own
rank saw; ``evaluate()`` sums the counts over all ranks (``mlps_dist.dist``, a no-op for a
single process), so every rank gets the result one process would compute over the whole
data. ``evaluate()`` is a collective: every rank calls ``run_eval`` with the same
evaluators in the same order. The loop leaves the grad mode to the caller (Grad-CAM masks
need gradients; validation runs under ``torch.no_grad``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from mlps_dist import dist
from mlps_dist.method.metrics import ConfusionMatrix, MultiLabelMeter, nanmean


class Evaluator:
    """What the loop asks of an evaluator (detectron2's DatasetEvaluator)."""

    def reset(self) -> None:
        """Forget everything counted so far (run_eval calls it before the first batch)."""
        raise NotImplementedError

    def process(self, batch, outputs) -> None:
        """Count one batch: ``batch`` as the loader yields it, ``outputs`` as predict_fn returns it."""
        raise NotImplementedError

    def evaluate(self):
        """The result over every rank's batches (collective)."""
        raise NotImplementedError


def run_eval(batches: Iterable, predict_fn: Callable[[Any], Any], evaluators: Mapping[str, Evaluator]) -> dict:
    """Reset every evaluator, predict and process each batch, and return
    ``{name: evaluator.evaluate()}`` in the order of ``evaluators``."""
    for evaluator in evaluators.values():
        evaluator.reset()
    for batch in batches:
        outputs = predict_fn(batch)
        for evaluator in evaluators.values():
            evaluator.process(batch, outputs)
    return {name: evaluator.evaluate() for name, evaluator in evaluators.items()}


class ConfusionEvaluator(Evaluator):
    """A segmentation map ``outputs[key]`` (B, H, W class indices) against ``batch["mask"]``;
    the result is ``ConfusionMatrix.compute()``: miou, fwiou, acc, macc, iou (per class)."""

    def __init__(self, num_classes: int, ignore_index: int, key: str = "classes", device="cpu"):
        self.key = key
        self.matrix = ConfusionMatrix(num_classes, ignore_index, device=device)

    def reset(self) -> None:
        self.matrix.reset()

    def process(self, batch, outputs) -> None:
        self.matrix.update(outputs[self.key], batch["mask"])

    def evaluate(self) -> dict:
        return self.matrix.all_reduce().compute()


class MultiLabelEvaluator(Evaluator):
    """Patch-level class probabilities ``outputs[key]`` (B, C) against ``batch["labels"]``;
    the result is ``MultiLabelMeter.compute()``: acc, label_acc, f1, f1_macro, f1_per_class."""

    def __init__(self, num_classes: int, key: str = "probs", threshold: float = 0.5, device="cpu"):
        self.key = key
        self.meter = MultiLabelMeter(num_classes, threshold, device=device)

    def reset(self) -> None:
        self.meter.reset()

    def process(self, batch, outputs) -> None:
        self.meter.update(outputs[self.key], batch["labels"])

    def evaluate(self) -> dict:
        return self.meter.all_reduce().compute()


class CamEvaluator(Evaluator):
    """Masks made from class activation maps, one per layer (``outputs[key][layer]``, B, H, W),
    against ``batch["mask"]``. The masks may hold the value C (white: background or a pixel
    no class claims); such a pixel of a tissue class counts as a miss, so each layer gets a
    confusion matrix with one extra prediction column. The result per layer is the
    ``ConfusionMatrix.compute()`` record with ``iou`` over the C classes only and ``miou``
    their nan-mean."""

    def __init__(self, num_classes: int, ignore_index: int, layers: Iterable[str], key: str = "masks", device="cpu"):
        self.num_classes, self.ignore_index, self.key = num_classes, ignore_index, key
        self.matrices = {layer: ConfusionMatrix(num_classes + 1, ignore_index, device=device) for layer in layers}

    def reset(self) -> None:
        for matrix in self.matrices.values():
            matrix.reset()

    def process(self, batch, outputs) -> None:
        target = batch["mask"]
        if self.ignore_index != self.num_classes and bool((target == self.num_classes).any()):
            # The extra column must not let a ground-truth value C pass as a class.
            raise ValueError(
                f"CamEvaluator: ground truth holds value {self.num_classes}, which is neither a class "
                f"0..{self.num_classes - 1} nor the ignore index {self.ignore_index}"
            )
        masks = outputs[self.key]
        for layer, matrix in self.matrices.items():
            matrix.update(masks[layer], target)

    def evaluate(self) -> dict[str, dict]:
        results = {}
        for layer, matrix in self.matrices.items():
            scores = matrix.all_reduce().compute()
            iou = scores["iou"][: self.num_classes]
            results[layer] = {**scores, "iou": iou, "miou": nanmean(torch.tensor(iou, dtype=torch.float64))}
        return results


class SkippedCounter(Evaluator):
    """How many samples the loader flagged as undecodable (``batch["bad"]``, present only
    when the loader skips bad samples), summed over ranks."""

    def __init__(self):
        self.count = torch.zeros(1, dtype=torch.int64)

    def reset(self) -> None:
        self.count.zero_()

    def process(self, batch, outputs) -> None:
        if "bad" in batch:
            self.count += batch["bad"].sum().cpu()

    def evaluate(self) -> int:
        return int(dist.all_reduce_sum(self.count.clone()).item())


class AgreementEvaluator(Evaluator):
    """Two predictions of the same pixels, ``outputs[a]`` and ``outputs[b]``, each a pair of
    numpy arrays (classes (N, H, W), scores (N, C, H, W)). The result: samples, pixels,
    class_agreement (the share of pixels with the same class; nan without pixels) and
    max_score_diff (the largest score difference; a nan score counts as infinitely far)."""

    def __init__(self, a: str, b: str):
        self.a, self.b = a, b
        self.reset()

    def reset(self) -> None:
        self.same = self.pixels = self.samples = 0
        self.max_diff = 0.0

    def process(self, batch, outputs) -> None:
        (classes_a, scores_a), (classes_b, scores_b) = outputs[self.a], outputs[self.b]
        self.same += int((classes_a == classes_b).sum())
        self.pixels += classes_a.size
        diff = np.abs(scores_a - scores_b)
        self.max_diff = max(self.max_diff, float(np.nan_to_num(diff, nan=np.inf).max()))
        self.samples += len(classes_a)

    def evaluate(self) -> dict:
        counts = dist.all_reduce_sum(torch.tensor([self.same, self.pixels, self.samples], dtype=torch.int64))
        same, pixels, samples = (int(v) for v in counts.tolist())
        max_diff = max(dist.all_gather_object(self.max_diff))
        return {
            "samples": samples,
            "pixels": pixels,
            "class_agreement": same / pixels if pixels else math.nan,
            "max_score_diff": max_diff,
        }


class ExampleCollector(Evaluator):
    """The first ``limit`` examples on rank 0, for pictures in the log; other ranks keep none.
    ``make(batch, outputs, count)`` turns the first ``count`` samples of a batch into examples."""

    def __init__(self, limit: int, make: Callable[[Any, Any, int], Iterable]):
        self.limit, self.make = limit, make
        self.examples: list = []

    def reset(self) -> None:
        self.examples = []

    def process(self, batch, outputs) -> None:
        room = self.limit - len(self.examples) if dist.is_main() else 0
        if room > 0:
            self.examples.extend(list(self.make(batch, outputs, room))[:room])

    def evaluate(self) -> list:
        return list(self.examples)
