"""The model behind segment_slides, built from a trained run (the torch side of the slide pass).

    model = create_slide_model("runs/luad", model_mpp=None, device=dist.device())
    model.scores(uint8 (N, 3, P, P), out_size=14)   # -> float32 (N, C, 14, 14)

Tiles go through mlps_dist.predict.predictor exactly as evaluation predicts a patch (normalisation,
resize to ``data.image_size``, segmenter, classification gate per tile); the softmax scores
after the gate are area-averaged down to the map grid. The training MPP comes from the
``mpp`` of the run's shards (``data.root``/info.json, written by mlps tile and
``mlps shards --mpp``), else ``model_mpp``; ``mpp`` stays None when neither says
it and the caller refuses to run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlps_dist.config import load_config
from mlps_dist.core import layout
from mlps_dist.core.draw import palette_for
from mlps_dist.predict.predictor import Predictor, create_predictor, training_patch_size


class RunSlideModel:
    def __init__(self, predictor: Predictor, classes: list[str], palette, mpp: float | None, patch_size: int):
        self.predictor, self.classes, self.palette = predictor, list(classes), palette
        self.mpp, self.patch_size = mpp, int(patch_size)
        self.stain = predictor.stain  # the run's stain normaliser (None: off)

    @torch.no_grad()
    def scores(self, tiles: np.ndarray, out_size: int, stain: bool = True) -> np.ndarray:
        """``stain`` False: the tiles' stains were normalised by the caller (a slide's estimate)."""
        scores = self.predictor(torch.from_numpy(np.ascontiguousarray(tiles)), stain=stain).scores()
        if tuple(scores.shape[-2:]) != (out_size, out_size):
            scores = F.interpolate(scores, size=(out_size, out_size), mode="area")
        return scores.float().cpu().numpy()


def run_info(cfg) -> dict | None:
    """The info.json of the run's shards, or None when they are not reachable from here."""
    try:
        from mlps_dist.data.shards import read_info

        return read_info(cfg.data.root)
    except (OSError, ValueError):
        return None


def create_slide_model(
    run_dir: str | Path,
    model_mpp: float | None = None,
    *,
    checkpoint: str = "best",
    gate: bool | None = None,
    gate_threshold: float | None = None,
    device="cpu",
) -> RunSlideModel:
    cfg = load_config(layout.existing_config_file(run_dir))
    predictor, meta = create_predictor(
        run_dir, cfg, checkpoint=checkpoint, gate=gate, gate_threshold=gate_threshold, device=device
    )
    info = run_info(cfg)
    num_classes = int(meta["num_classes"])
    classes = list(meta.get("classes") or (info or {}).get("classes") or [f"class{i}" for i in range(num_classes)])
    mpp = (info or {}).get("mpp") or model_mpp
    return RunSlideModel(
        predictor, classes, palette_for(num_classes, info), float(mpp) if mpp else None, training_patch_size(cfg, info)
    )
