"""torch back end: map-style datasets over a SplitReader, our batch lists, torch DataLoader.

Batches are fixed lists of sample indices computed up front (sampling.py), handed to the
DataLoader as its ``batch_sampler``: each batch is built by exactly one worker, so the
output does not depend on the number of workers, and resuming is slicing that list.
"""

from __future__ import annotations


import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlps_dist.config import Config
from mlps_dist.data.augment import IDENTITY, colour, geometric, normalise, photometric, sample_params
from mlps_dist.data.colour_lut import model_input_chw
from mlps_dist.data.decode import decode_indices, decode_labels, decode_rgb, resize_rgb  # noqa: F401 (re-exported)
from mlps_dist.data.shards import SplitReader
from mlps_dist.run.stain_run import load_normaliser


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
        self.stain = load_normaliser(cfg.run_dir, cfg.data.stain.method)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        sample = self.reader.read(index)
        params = sample_params(self.augment, self.seed, self.epoch, index)
        rgb = decode_normalised(sample["image"], self.stain, self.data.image_size)
        if params.blur_sigma > 0 or params.has_hed:  # these mix pixels or channels: no lookup table
            image = normalise(photometric(geometric(rgb, params).astype(np.float32), params), self.data.mean,
                              self.data.std)
        else:
            image = model_input_chw(rgb, params, self.data.mean, self.data.std)  # == normalise(colour(geometric))
        out = {"image": torch.from_numpy(image), "labels": torch.from_numpy(decode_labels(sample["labels"])),
               "index": torch.tensor(index, dtype=torch.int64), "key": self.reader.key(index)}
        if self.pseudo_masks is not None:
            layers = [geometric(decode_indices(png, self.data.image_size), params)
                      for png in self.pseudo_masks.read_pngs(index)]
            out["masks"] = torch.from_numpy(np.stack(layers))  # uint8: 8x less to move; the loss widens it
        return out


class EvalDataset(Dataset):
    """No augmentation and no resizing: evaluation runs at the stored resolution. "image" and
    "rgb" are both stain-normalised (data.stain), as the predictor would do to uint8 input."""

    def __init__(self, cfg: Config, reader: SplitReader):
        self.data, self.reader = cfg.data, reader
        self.stain = load_normaliser(cfg.run_dir, cfg.data.stain.method)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        sample = self.reader.read(index)
        rgb = decode_normalised(sample["image"], self.stain)
        out = {"image": torch.from_numpy(normalise(colour(rgb.astype(np.float32), IDENTITY),
                                                   self.data.mean, self.data.std)),
               "rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
               "labels": torch.from_numpy(decode_labels(sample["labels"])),
               "index": torch.tensor(index, dtype=torch.int64), "key": self.reader.key(index)}
        if self.reader.has_masks:
            out["mask"] = torch.from_numpy(decode_indices(sample["mask.png"]).astype(np.int64))
        return out


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
            yield {k: v.to(self.device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                   for k, v in batch.items()}


def create_torch_loader(dataset: Dataset, batches: list[list[int]], num_workers: int, device) -> DeviceLoader:
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers if batches else 0,
                        pin_memory=torch.device(device).type == "cuda", persistent_workers=False)
    return DeviceLoader(loader, len(batches), device)
