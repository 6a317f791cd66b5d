"""The one prediction path: patches -> model at the training scale -> gate -> stored size.

Every consumer of a trained run goes through here: validation in stage 3, evaluation,
`infer`, the visualiser, the slide tools and the export parity checks. So a patch is
predicted the same way wherever it comes from:

1. uint8 input: stain normalisation (``data.stain``: the run's reference, per image; see
   stain.py), then ``data.mean`` / ``data.std``; float input was normalised by the caller
   (the evaluation dataset does both);
2. resize to ``data.image_size``, the scale the networks were trained at (textures keep the
   size they were learnt at; a no-op when the patch already has that size);
3. segmenter logits, and the stage-1 classifier's sigmoid probabilities for the gate;
   with ``evaluate.refine`` on, the logits become the log of the softmax scores refined
   along the patch's colours at this scale (cam_refine.refine_scores);
4. logits upsampled (bilinear) back to the size the patch came in at;
5. the gate: classes with probability <= ``gate_threshold`` get logit -inf (see gate.py).

Larger images are cut into windows of the training patch size (``sliding_window``), each
window predicted as above; the gated scores (softmax after the gate) are averaged where
windows overlap (the rule of mlps_dist.deploy.windows, shared with the exported ONNX model).

    predictor = create_predictor(run_dir)               # from RUN/config.yaml + model files
    out = predictor(images)                              # normalised (B,3,H,W)
    out.classes()                                        # gated argmax (B,H,W)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlps_dist.data.augment import model_input
from mlps_dist.deploy.windows import window_boxes
from mlps_dist.method.cam_refine import refine_scores
from mlps_dist.predict.gate import allowed_classes, apply_gate


@dataclass
class Prediction:
    """Outputs for a batch, all at the input's spatial size."""

    logits: torch.Tensor  # (B, C, H, W) float32, ungated (log-scores when refined)
    probs: torch.Tensor | None = None  # (B, C) classifier probabilities; None without a gate
    allowed: torch.Tensor | None = None  # (B, C) or (B, C, H, W) bool; None without a gate

    def gated_logits(self) -> torch.Tensor:
        return self.logits if self.allowed is None else apply_gate(self.logits, self.allowed)

    def classes(self, gated: bool = True) -> torch.Tensor:
        """(B, H, W) int64 class index per pixel."""
        return (self.gated_logits() if gated else self.logits).argmax(1)

    def scores(self) -> torch.Tensor:
        """(B, C, H, W) softmax after the gate (gated classes score exactly 0)."""
        return torch.softmax(self.gated_logits(), dim=1)


class Predictor:
    """Segmenter (+ optional gate classifier) behind the training-scale contract above."""

    def __init__(
        self,
        segmenter: torch.nn.Module,
        classifier: torch.nn.Module | None,
        *,
        image_size: int,
        mean,
        std,
        gate_threshold: float = 0.1,
        precision: str = "fp32",
        refine: dict | None = None,
        stain=None,
        device="cpu",
    ):
        """``refine``: keyword arguments of cam_refine.refine_cams, None = the plain argmax.
        ``stain``: a stain.StainNormaliser for uint8 input, None = off."""
        self.segmenter, self.classifier = segmenter.eval(), classifier.eval() if classifier is not None else None
        self.stain = stain
        self.refine = dict(refine) if refine else None
        self.image_size, self.gate_threshold = int(image_size or 0), float(gate_threshold)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.precision = precision

    @property
    def gated(self) -> bool:
        return self.classifier is not None

    def normalise(self, rgb: torch.Tensor, stain: bool = True) -> torch.Tensor:
        """uint8 RGB (B, 3, H, W) -> normalised float32 on the predictor's device; ``stain``
        False: the caller has already normalised the stains (sliding_window, whole image)."""
        if stain and self.stain is not None:
            rgb = torch.from_numpy(self.stain.tiles(rgb.cpu().numpy()))
        return (rgb.to(self.device, non_blocking=True).float() / 255.0 - self.mean) / self.std

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.precision != "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, out_size: tuple[int, int] | None = None, stain: bool = True) -> Prediction:
        """``images``: normalised float (B, 3, H, W), or uint8 RGB (normalised here, stains
        included unless ``stain`` is False). ``out_size``: size of the returned maps, default
        the input's (H, W)."""
        if images.dtype == torch.uint8:
            images = self.normalise(images, stain)
        images = images.to(self.device, non_blocking=True)
        size = tuple(out_size or images.shape[-2:])
        x = model_input(images, self.image_size)
        with self._autocast():
            logits = self.segmenter(x)
        logits = logits.float()
        if self.refine:
            logits = refine_scores(logits, x, self.mean, self.std, **self.refine)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.classifier is None:
            return Prediction(logits)
        with self._autocast():
            probs = torch.sigmoid(self.classifier(x).float())
        return Prediction(logits, probs, allowed_classes(probs, self.gate_threshold))


@torch.no_grad()
def sliding_window(
    predictor: Predictor, rgb: np.ndarray, window: int, overlap: float = 0.5, batch_size: int = 8
) -> Prediction:
    """Predict an (H, W, 3) uint8 image of any size with windows of ``window`` px (the
    training patch size). Returns a Prediction with batch 1 whose ``logits`` are the log of
    the blended scores (windows.py's rule), so ``classes()`` is the argmax of the averaged
    gated scores and ``scores()`` the averaged scores; the gate is already inside. Stains are
    normalised once over the whole image (more tissue to estimate from than one window)."""
    if predictor.stain is not None:
        rgb = predictor.stain(rgb)
    h, w = rgb.shape[:2]
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    boxes = window_boxes(h, w, window, overlap)
    wh, ww = min(window, h), min(window, w)
    score_sum = count = None
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        scores = predictor(torch.cat([image[:, :, y : y + wh, x : x + ww] for y, x in chunk]), stain=False).scores()
        if score_sum is None:
            score_sum = torch.zeros(scores.shape[1], h, w, device=predictor.device)
            count = torch.zeros(1, h, w, device=predictor.device)
        for i, (y, x) in enumerate(chunk):
            score_sum[:, y : y + wh, x : x + ww] += scores[i]
            count[:, y : y + wh, x : x + ww] += 1
    return Prediction(torch.log(score_sum / count)[None])


def training_patch_size(cfg, info: dict | None) -> int:
    """Side of the patches the run was trained on, as stored in the shards (falls back to
    ``data.image_size``, then 224)."""
    from mlps_dist.data.shards import train_image_size

    stored = train_image_size(info)
    if stored:
        return int(stored[0])
    return int(cfg.data.image_size or 224)


def create_predictor(
    run_dir: str | Path,
    cfg=None,
    *,
    checkpoint: str = "best",
    gate: bool | None = None,
    gate_threshold: float | None = None,
    num_classes: int | None = None,
    device="cpu",
) -> tuple[Predictor, dict]:
    """Predictor of a finished run (RUN/config.yaml, segmenter and classifier files).
    Returns (predictor, segmenter meta); ``meta["classifier"]`` records the gate's stage-1
    model (``classifier.checkpoint``: checkpoint, file, epoch, score, digest), None ungated."""
    from mlps_dist.config import load_config
    from mlps_dist.core import layout
    from mlps_dist.data.stain_run import load_normaliser
    from mlps_dist.predict.gate import load_classifier, load_segmenter

    if cfg is None:
        cfg = load_config(layout.existing_config_file(run_dir))
    segmenter, meta = load_segmenter(run_dir, checkpoint, num_classes, device)
    use_gate = cfg.evaluate.gate if gate is None else gate
    classifier, selection = None, None
    if use_gate:
        classifier, cls_meta = load_classifier(
            run_dir, int(meta["num_classes"]), device, checkpoint=cfg.classifier.checkpoint
        )
        selection = {**cls_meta["selection"], "digest": file_digest(cls_meta["path"])}
    threshold = cfg.evaluate.gate_threshold if gate_threshold is None else gate_threshold
    predictor = Predictor(
        segmenter,
        classifier,
        image_size=cfg.data.image_size,
        mean=cfg.data.mean,
        std=cfg.data.std,
        gate_threshold=threshold,
        precision=cfg.segmenter.precision,
        refine=cfg.evaluate.refine.as_kwargs(),
        stain=load_normaliser(run_dir, cfg.data.stain.method),
        device=device,
    )
    return predictor, {**meta, "classifier": selection}


def file_digest(path: str | Path) -> str:
    """First 16 hex digits of the file's sha256."""
    from mlps_dist.core.fileio import sha256_file

    return sha256_file(path)[:16]
