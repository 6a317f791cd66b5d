"""A run's stain reference: fitted by stage 1 on the training shards, read by everyone after.

    write_reference(cfg)            # stage 1, before its loaders start (every rank: same bytes)
    normaliser = load_normaliser(cfg.run_dir, cfg.data.stain.method)   # None when off
    stain = split_stain(cfg, reader)  # what a loader of that split applies (od_match: per split)

The reference is a pure function of the training shards and ``data.stain``, so every rank
fits it for itself (no broadcast, no wait for rank 0) and writes the same file atomically.
Consumers of a finished run (evaluation, infer, slides, export) read RUN/classifier/stain.json,
never the shards: the shards need not exist where the model is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlps_dist.config import Config, ConfigError
from mlps_dist.core.fileio import atomic_write_json
from mlps_dist.core.layout import stain_file
from mlps_dist.core.stain import fit_reference
from mlps_dist.core.stain_match import create_stain, fit_od_match, for_set, spread
from mlps_dist.data.decode import decode_rgb
from mlps_dist.data.shards import SplitReader, open_split


def fit_from_shards(cfg: Config) -> dict:
    """The reference of ``data.stain.method`` from ``data.stain.fit_images`` training patches
    spread evenly over the split (at their stored size)."""
    reader = open_split(cfg.data.root, "train")
    count = min(cfg.data.stain.fit_images, len(reader))
    indices = sorted({round(i * (len(reader) - 1) / max(count - 1, 1)) for i in range(count)})
    images = (decode_rgb(reader.read(i)["image"]) for i in indices)
    try:
        if cfg.data.stain.method == "od_match":
            ref = fit_od_match(images)
        else:
            ref = fit_reference(cfg.data.stain.method, images)
    except ValueError as exc:
        raise ConfigError(f"{cfg.data.root}: {exc}") from exc
    return {**ref, "fitted_on": {"root": str(cfg.data.root), "patches": len(indices)}}


def write_reference(cfg: Config) -> dict | None:
    """Fit and store the run's reference (nothing when ``data.stain.method`` is none)."""
    if cfg.data.stain.method == "none":
        return None
    ref = fit_from_shards(cfg)
    atomic_write_json(stain_file(cfg.run_dir), ref)
    return ref


def read_reference(run_dir: str | Path, method: str) -> dict | None:
    """The stored reference of a run whose config says ``data.stain.method`` = ``method``."""
    if method == "none":
        return None
    path = stain_file(run_dir)
    try:
        ref = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: data.stain.method is '{method}', and stage 1 writes the stain "
            f"reference; run the classifier stage (or restart from it)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); restart the run from the classifier stage") from None
    if not isinstance(ref, dict) or ref.get("method") != method:
        got = ref.get("method") if isinstance(ref, dict) else type(ref).__name__
        raise ConfigError(
            f"{path} holds a '{got}' reference, the config says data.stain.method={method}; "
            f"restart the run from the classifier stage"
        )
    return ref


def load_normaliser(run_dir: str | Path, method: str):
    """The run's stain object (stain_match.create_stain), None when data.stain.method is none."""
    return create_stain(read_reference(run_dir, method))


def split_stain(cfg: Config, reader: SplitReader, run_dir: str | Path | None = None):
    """What a loader of ``reader``'s split applies to its patches. Per-image methods: the
    normaliser, each patch on its own. ``od_match``: nothing on the training split (it is the
    reference), any other split matched as a whole, with one estimate from up to
    stain_match.SET_IMAGES of its patches spread evenly over it (every rank the same)."""
    stain = load_normaliser(run_dir or cfg.run_dir, cfg.data.stain.method)
    if stain is None or stain.default_scope == "image":
        return stain
    if reader.split == "train":
        return None
    return for_set(stain, "set", (decode_rgb(reader.read(i)["image"]) for i in spread(len(reader))))
