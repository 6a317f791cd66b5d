"""Run directories as stages 1 and 3 leave them, with untrained weights, for the tests that
load a trained run (inference, export, evaluation, slides, the tools' stamps)."""

from __future__ import annotations

from pathlib import Path

import torch

from mlps_dist.config import config_from_dict, save_config
from mlps_dist.models import create_classifier, create_segmenter
from mlps_dist.train.checkpoint import save_model_file

CLASSES = ["TE", "NEC", "LYM", "TAS"]


def make_run(run_dir: Path, data_root: str = "missing-shards", image_size: int = 32, seed: int = 0) -> Path:
    """A run directory as stages 1 and 3 leave it: config.yaml, classifier and segmenter files
    (untrained weights: these tests check plumbing and geometry, not accuracy)."""
    cfg = config_from_dict(
        {
            "run_dir": str(run_dir),
            "data": {"root": data_root, "image_size": image_size},
            "classifier": {"model": "small38"},
            "segmenter": {"model": "deeplabv3plus_small"},
        }
    )
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(seed)
    for stage, factory, name in (
        ("classifier", create_classifier, "small38"),
        ("segmenter", create_segmenter, "deeplabv3plus_small"),
    ):
        model = factory(name, len(CLASSES))
        meta = {"name": name, "num_classes": len(CLASSES), "classes": CLASSES, "config": cfg.to_dict()}
        save_model_file(run_dir / stage / "model.pt", model.state_dict(), meta)
    return run_dir
