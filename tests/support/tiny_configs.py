"""The config of a whole pipeline that a CPU runs in seconds, for the tests that launch stages."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(path: Path, shards: Path, classifier_epochs: int = 1, segmenter_epochs: int = 1) -> Path:
    """Small CPU models on the tiny shards; a checkpoint after every optimizer step."""
    train = {"batch_size": 8, "lr": 0.01, "ckpt_every_steps": 1, "log_every_steps": 1}
    path.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "data": {"root": str(shards), "num_workers": 0, "image_size": 32},
                "classifier": {
                    "model": "small38",
                    "epochs": classifier_epochs,
                    "cam_images": 0,
                    "pda": {"start_epoch": 1},
                    **train,
                },
                "masks": {"batch_size": 8, "chunk_size": 8},
                "segmenter": {"model": "deeplabv3plus_small", "epochs": segmenter_epochs, "vis_images": 0, **train},
                "evaluate": {"batch_size": 4, "splits": ["test"]},
            }
        )
    )
    return path
