"""The deployable graph: uint8 RGB in; classes, gated scores and the gate's probabilities out.

``DeployGraph`` wraps a Predictor's networks into one torch module whose forward is exactly
mlps_dist.predict.predictor's path for a batch of patches, written with operations that the ONNX
exporter maps to plain ONNX operators for any N, H, W:

1. ``uint8 (N, 3, H, W)`` -> float, ``(x / 255 - mean) / std``;
2. resize to ``data.image_size`` with the antialiased bilinear filter that training and
   evaluation use (``F.interpolate(..., antialias=True)``). ONNX's Resize has no antialias
   before opset 18 and torch's exporter does not translate the antialiased kernel, so the
   filter is written out as two matrices built from H and W inside the graph:
   ``out = Rh @ x @ Rw^T``, rows of Rh/Rw the normalised triangle weights torch computes.
   When H = image_size the matrix is the identity, matching predict's "no resize";
3. segmenter logits; classifier sigmoid probabilities (``presence``); with a refinement
   (``evaluate.refine``), the log of the softmax scores refined along the colours
   (cam_refine.refine_scores, unrolled into the graph);
4. logits upsampled (bilinear, align_corners=False) back to (H, W);
5. the gate: classes with probability <= threshold get -inf; a patch whose classes are all
   gated off keeps its ungated logits (gate.apply_gate);
6. ``scores`` = softmax over classes, ``classes`` = argmax of the gated logits.

Without a classifier (an ungated export) ``presence`` is all ones and nothing is gated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlps_dist.method.cam_refine import refine_scores

INPUT_NAME = "image"
OUTPUT_NAMES = ("classes", "scores", "presence")


def antialias_matrix(in_size: torch.Tensor, out_size: int, dtype=torch.float32) -> torch.Tensor:
    """(out_size, in_size) weights of torch's antialiased bilinear resize along one axis
    (aten ``_compute_weights_aa`` with the triangle filter): for output pixel i,
    ``center = scale * (i + 0.5)``, ``support = max(scale, 1)``, weight of input pixel k
    ``max(0, 1 - |k + 0.5 - center| / support)``, each row normalised to sum 1. ``in_size``
    is a 0-d tensor so that the graph keeps H and W dynamic."""
    in_size = in_size.to(dtype)
    scale = in_size / out_size
    support = torch.clamp(scale, min=1.0)
    centers = (torch.arange(out_size, dtype=dtype) + 0.5) * scale
    inputs = torch.arange(in_size.to(torch.int64), dtype=dtype) + 0.5
    weights = torch.clamp(1.0 - (inputs[None, :] - centers[:, None]).abs() / support, min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def antialiased_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), equal (to float rounding) to
    ``F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)``."""
    shape = torch._shape_as_tensor(x)
    rows = antialias_matrix(shape[2], size)  # (size, H)
    cols = antialias_matrix(shape[3], size)  # (size, W)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class DeployGraph(torch.nn.Module):
    """Normalisation, training-scale resize, segmenter, classifier gate, upsampling: one module."""

    def __init__(
        self,
        segmenter: torch.nn.Module,
        classifier: torch.nn.Module | None,
        *,
        image_size: int,
        mean,
        std,
        gate_threshold: float,
        refine: dict | None = None,
    ):
        super().__init__()
        self.refine = dict(refine) if refine else None
        self.segmenter, self.classifier = segmenter.eval(), classifier.eval() if classifier is not None else None
        self.image_size, self.gate_threshold = int(image_size or 0), float(gate_threshold)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.eval()  # the exporter restores this mode afterwards, on the shared networks too

    @classmethod
    def from_predictor(cls, predictor) -> DeployGraph:
        return cls(
            predictor.segmenter,
            predictor.classifier,
            image_size=predictor.image_size,
            mean=predictor.mean.flatten().tolist(),
            std=predictor.std.flatten().tolist(),
            gate_threshold=predictor.gate_threshold,
            refine=predictor.refine,
        )

    def forward(self, image: torch.Tensor):
        x = (image.float() / 255.0 - self.mean) / self.std
        if self.image_size:
            x = antialiased_resize(x, self.image_size)
        logits = self.segmenter(x).float()
        if self.refine:
            logits = refine_scores(logits, x, self.mean, self.std, **self.refine)
        size = torch._shape_as_tensor(image)[2:]
        logits = F.interpolate(logits, size=(size[0], size[1]), mode="bilinear", align_corners=False)
        if self.classifier is None:
            presence = torch.ones(logits.shape[:2], dtype=logits.dtype)
            gated = logits
        else:
            presence = torch.sigmoid(self.classifier(x).float())
            allowed = presence > self.gate_threshold
            keep = allowed | ~allowed.any(dim=1, keepdim=True)  # all gated off: ungated fallback
            gated = logits.masked_fill(~keep[:, :, None, None], float("-inf"))
        return gated.argmax(dim=1), torch.softmax(gated, dim=1), presence
