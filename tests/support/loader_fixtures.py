"""What the loader and augmentation tests share: a config over given shards with data and
augment keys set, and pseudo masks derived from the images themselves."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from mlps_dist.config import AugmentConfig, Config

AUGMENT_KEYS = {f.name for f in dataclasses.fields(AugmentConfig)}


def make_cfg(root, loader="torch", workers=0, **keys) -> Config:
    """data.* keys, and augment keys set for both stages alike."""
    cfg = Config()
    cfg.data.root, cfg.data.loader, cfg.data.num_workers = str(root), loader, workers
    for key, value in keys.items():
        for section in (cfg.classifier.augment, cfg.segmenter.augment) if key in AUGMENT_KEYS else (cfg.data,):
            setattr(section, key, value)
    return cfg


class RedChannelMasks:
    """Pseudo masks derived from the image itself (red channel quantised to 0..4), so a
    correctly joint transform keeps mask == quantise(transformed image)."""

    layers = ["coarse", "fine"]

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def missing(self, n):
        return [i for i in range(n) if i >= len(self.reader)]

    def read_pngs(self, index):
        red = np.asarray(Image.open(io.BytesIO(self.reader.read(index)["png"])).convert("RGB"))[..., 0]
        out = []
        for levels in (2, 5):
            buf = io.BytesIO()
            Image.fromarray((red.astype(np.int32) * levels // 256).astype(np.uint8)).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
