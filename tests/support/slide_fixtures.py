"""What the whole-slide tests share: the synthetic slides' size, a model that recovers a
flat-colour slide's true map exactly, segment_slides run with it, and the samples of tiled shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlps_dist.synthetic.patches import PALETTE

W, H, CELL = 768, 512, 200


class ColourModel:
    """Per-pixel rule: the class whose palette colour is nearest. On a flat-colour slide the
    true map is recovered exactly, so any error comes from tiling, placement or blending."""

    classes = ["TE", "NEC", "LYM", "TAS"]
    palette = [tuple(c) for c in PALETTE]
    mpp = 2.0
    patch_size = 32

    def scores(self, tiles, out_size):
        rgb = tiles.transpose(0, 2, 3, 1).astype(np.float32)
        dist = ((rgb[..., None, :] - np.asarray(PALETTE[:4], np.float32)) ** 2).sum(-1)
        onehot = np.eye(4, dtype=np.float32)[dist.argmin(-1)]  # (N, P, P, C)
        n, p = onehot.shape[0], onehot.shape[1]
        f = p // out_size
        pooled = onehot[:, : out_size * f, : out_size * f].reshape(n, out_size, f, out_size, f, 4).mean((2, 4))
        return pooled.transpose(0, 3, 1, 2)


def segment(root: Path, out: Path, model=None, *extra) -> int:
    """segment_slides over ROOT/slides into OUT at 4 um/px, with ColourModel unless MODEL is given."""
    from mlps_dist.cli import segment as segment_cmd
    from mlps_dist.deploy import segment_slides

    args = segment_cmd.parse_args(
        ["--run", "unused", "--slides", str(root / "slides"), "--out", str(out), "--map-mpp", "4", *extra]
    )
    return segment_slides.run(args, model=model or ColourModel())


def read_samples(out: Path, split: str):
    """(key, metadata, sample) of every sample of OUT's SPLIT, in order."""
    from mlps_dist.data.shards import open_split

    reader = open_split(out, split)
    for i in range(len(reader)):
        sample = reader.read(i)
        yield reader.key(i), json.loads(sample["json"]), sample
