"""torch back end: map-style datasets over a SplitReader, our batch lists, torch DataLoader.

Batches are fixed lists of sample indices computed up front (sampling.py), handed to the
DataLoader as its ``batch_sampler``: each batch is built by exactly one worker, so the
output does not depend on the number of workers, and resuming is slicing that list.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlps_dist.config import Config
from mlps_dist.core.errors import MlpsError
from mlps_dist.data.augment import geometric, normalise, photometric, sample_params
from mlps_dist.data.colour_lut import model_input_chw
from mlps_dist.data.decode import decode_indices, decode_labels, decode_rgb, decode_sample, resize_rgb
from mlps_dist.data.sample_errors import DECODE_ERRORS, REMAKE, SampleError, undecodable
from mlps_dist.data.shards import SplitReader
from mlps_dist.data.stain_run import split_stain


def decode_normalised(encoded: bytes, stain, size: int = 0) -> np.ndarray:
    """decode_rgb with the run's stain normalisation (None = off) applied at the stored size,
    before any resize: the same order as the prediction path (predict.Predictor)."""
    if stain is None:
        return decode_rgb(encoded, size)
    return resize_rgb(stain(decode_rgb(encoded)), size)


class TrainDataset(Dataset):
    def __init__(self, cfg: Config, reader: SplitReader, epoch: int, pseudo_masks=None, augment=None):
        self.data, self.seed, self.epoch = cfg.data, cfg.seed, epoch
        self.augment = augment if augment is not None else cfg.classifier.augment
        self.reader, self.pseudo_masks = reader, pseudo_masks
        self.stain = split_stain(cfg, reader)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        sample = self.reader.read(index)
        params = sample_params(self.augment, self.seed, self.epoch, index)
        rgb = decode_normalised(sample["image"], self.stain, self.data.image_size)
        if params.blur_sigma > 0 or params.has_hed:  # these mix pixels or channels: no lookup table
            image = normalise(
                photometric(geometric(rgb, params).astype(np.float32), params), self.data.mean, self.data.std
            )
        else:
            image = model_input_chw(rgb, params, self.data.mean, self.data.std)  # == normalise(colour(geometric))
        out = {
            "image": torch.from_numpy(image),
            "labels": torch.from_numpy(decode_labels(sample["labels"])),
            "index": torch.tensor(index, dtype=torch.int64),
            "key": self.reader.key(index),
        }
        if self.pseudo_masks is not None:
            layers = [
                geometric(decode_indices(png, self.data.image_size), params)
                for png in self.pseudo_masks.read_pngs(index)
            ]
            out["masks"] = torch.from_numpy(np.stack(layers))  # uint8: 8x less to move; the loss widens it
        return out


class EvalDataset(Dataset):
    """The samples of a split as stored (no augmentation, no resizing), for every pass that
    scores or masks shards: validation and evaluation (``purpose="evaluate"``), the mask pass
    and its quality report (``purpose="masks"``).

    A sample: "image" (3, H, W) float32 normalised, "rgb" (3, H, W) uint8, "labels" (C,),
    "index", "key", "source" (the file it was made from), "mask" (H, W) int64 where the split
    has masks, "bad" (1 for a blank, else 0) and "why" (the reason, else ""). "image" and
    "rgb" are stain-normalised (data.stain), as the predictor would do to uint8 input.

    A sample that cannot be decoded, differs from the split's image_size or has no labels
    (the mask pass also needs one class marked) stops the pass naming its shard and key
    (SampleError, exit 2; the fix names ``<purpose>.skip_bad``). With ``skip_bad`` it is
    named in a warning instead and replaced by a blank whose mask is all ignore: it counts
    in no metric, and the mask pass gives it all-ignore masks.
    """

    # What skip_bad does with a bad sample, as the fix offers it and as the warning reports it.
    SKIP = {
        "evaluate": ("leave it out of the metrics", "left out of the metrics"),
        "masks": ("give it all-ignore masks", "given all-ignore masks"),
    }

    def __init__(self, cfg: Config, reader: SplitReader, *, skip_bad: bool = False, purpose: str = "evaluate"):
        if purpose not in self.SKIP:
            raise ValueError(f"purpose {purpose!r}; choose one of {', '.join(self.SKIP)}")
        self.data, self.reader, self.skip_bad, self.purpose = cfg.data, reader, skip_bad, purpose
        self.size = tuple(reader.split_info.get("image_size") or ())
        self.stain = split_stain(cfg, reader)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        try:
            return {**self._sample(index), "bad": torch.tensor(0, dtype=torch.int64), "why": ""}
        except MlpsError:
            raise
        except BadSample as exc:
            why = f"{self.reader.location(index)}: {exc}"
        except DECODE_ERRORS as exc:
            why = undecodable(self.reader, index, exc)
        offer, done = self.SKIP[self.purpose]
        if not self.skip_bad:
            raise SampleError(f"{why}; {REMAKE}, or set {self.purpose}.skip_bad=true to {offer}") from None
        print(f"warning: {why}: {done} ({self.purpose}.skip_bad)", file=sys.stderr, flush=True)
        return self._blank(index, why)

    def _sample(self, index: int) -> dict:
        sample = decode_sample(self.reader.read(index))
        if "labels" not in sample:
            raise BadSample("has no 'labels' member: patch-level labels are needed")
        labels = sample["labels"]
        if self.purpose == "masks" and (labels.shape != (self.reader.num_classes,) or labels.sum() < 1):
            raise BadSample(f"labels {labels.tolist()} must mark at least one of {self.reader.num_classes} classes")
        rgb = sample["rgb"] if self.stain is None else self.stain(sample["rgb"])
        if self.size and rgb.shape[:2] != self.size:
            raise BadSample(f"patch is {rgb.shape[1]}x{rgb.shape[0]}, the split's image_size is {list(self.size)}")
        out = {
            "rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
            "labels": torch.from_numpy(labels),
            "index": torch.tensor(index, dtype=torch.int64),
            "key": self.reader.key(index),
            "source": sample.get("meta", {}).get("source", "") or f"{self.reader.key(index)}.png",
        }
        out["image"] = self._normalised(out["rgb"])
        if self.reader.has_masks:
            out["mask"] = torch.from_numpy(sample["mask"].astype(np.int64))
        return out

    def _normalised(self, rgb: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> float32 normalised by data.mean/std. The two forms agree up to
        float rounding; each pass keeps its own so that its masks and metrics stay bit-identical."""
        if self.purpose == "masks":
            mean, std = torch.tensor(self.data.mean).view(3, 1, 1), torch.tensor(self.data.std).view(3, 1, 1)
            return (rgb.float() / 255.0 - mean) / std
        rgb = rgb.numpy().transpose(1, 2, 0).astype(np.float32)
        return torch.from_numpy(normalise(rgb, self.data.mean, self.data.std))

    def _blank(self, index: int, why: str) -> dict:
        """A sample that counts in no metric: black, every class labelled (the CAMs need one),
        its mask all ignore."""
        height, width = self.size or (self.data.image_size or 64,) * 2
        rgb = torch.zeros(3, height, width, dtype=torch.uint8)
        out = {
            "rgb": rgb,
            "image": self._normalised(rgb),
            "labels": torch.ones(self.reader.num_classes),
            "index": torch.tensor(index, dtype=torch.int64),
            "key": self.reader.key(index),
            "source": f"{self.reader.key(index)}.png",
            "bad": torch.tensor(1, dtype=torch.int64),
            "why": why,
        }
        if self.reader.has_masks:
            out["mask"] = torch.full((height, width), self.reader.ignore_index, dtype=torch.int64)
        return out


class BadSample(ValueError):
    """A decoded sample that does not fit its split (no labels, no class, another size)."""


class DeviceLoader:
    """Iterates a DataLoader and moves the tensors of each batch to ``device``."""

    def __init__(self, loader: DataLoader, num_batches: int, device):
        self.loader, self.num_batches, self.device = loader, num_batches, torch.device(device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        if self.num_batches == 0:  # a rank without samples: zero batches, no workers started
            return
        non_blocking = self.device.type == "cuda"
        for batch in self.loader:
            yield {
                k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()
            }


def create_torch_loader(
    dataset: Dataset, batches: list[list[int]], num_workers: int, device, prefetch_factor: int | None = None
) -> DeviceLoader:
    """``prefetch_factor``: batches each worker decodes ahead (None: torch's default, 2)."""
    workers = num_workers if batches else 0
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
    )
    return DeviceLoader(loader, len(batches), device)
