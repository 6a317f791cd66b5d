"""DALI back end: our sampler feeds encoded PNG bytes and augmentation parameters through
``fn.external_source``; DALI decodes, transforms and normalises.

DALI's own webdataset reader shuffles with internal state that cannot resume in the middle
of an epoch, so the order comes from sampling.py, as in the torch back end, and the
per-sample parameters from augment.py: both back ends yield the same samples with the
same geometry. Decoding uses ``device="mixed"`` when the rank has a GPU: JPEG shards
(``make_shards.py --image-format jpeg``) are decoded by nvJPEG on the GPU, PNG and WebP by
DALI's CPU threads; augmentation then runs on the GPU. Without a GPU everything runs on the
CPU. The pipeline prefetches two batches, so decoding overlaps the training step. The
Python source only reads bytes and draws parameters (decoding happens in DALI's threads,
outside the GIL); on a GPU rank it runs in parallel worker processes
(``data.dali_source_workers``), so the training thread never does even that.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mlps_dist.config import Config
from mlps_dist.data.augment import IDENTITY, LOG_FLOOR, photometric_inputs, photometric_ops, sample_params
from mlps_dist.data.shards import SplitReader


def _as_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8)


def _identity_params(index: int):
    return IDENTITY


class _BatchSource:
    """Batch ``i`` of the plan as input lists for ``fn.external_source(num_outputs=...)``.

    Stateless (a function of the batch number, as DALI's parallel mode requires) and
    picklable: ``params_of`` and ``masks_of`` must be module-level callables, partials or
    bound methods of picklable readers, so that spawned worker processes can run it."""

    def __init__(self, reader, batches, params_of, num_masks, masks_of, with_mask, ops=(False, False)):
        self.reader, self.batches, self.params_of = reader, batches, params_of
        self.num_masks, self.masks_of, self.with_mask = num_masks, masks_of, with_mask
        self.ops, self.num_extra = ops, sum(ops)  # blur kernel and/or HED map columns

    @property
    def num_outputs(self) -> int:
        return 6 + self.num_extra + self.num_masks

    def __call__(self, iteration: int):
        if iteration >= len(self.batches):  # DALI may ask past the end while prefetching
            raise StopIteration
        cols: list[list[np.ndarray]] = [[] for _ in range(self.num_outputs)]
        for index in self.batches[iteration]:
            sample = self.reader.read(index)
            p = self.params_of(index)
            pngs = list(self.masks_of(index)) if self.masks_of else ([sample["mask.png"]] if self.with_mask else [])
            values = [_as_bytes(sample["image"]), np.array(p.transpose), np.array(int(p.hflip), np.int32),
                      np.array(int(p.vflip), np.int32), np.asarray(p.gain, np.float32),
                      np.array(p.offset * 255.0, np.float32)] + photometric_inputs(p, self.ops) + [
                      _as_bytes(png) for png in pngs]
            for col, value in zip(cols, values):
                col.append(value)
        return tuple(cols)


def source_workers(cfg: Config, device: torch.device, eval_mode: bool = False) -> int:
    """Python processes for the parallel external source: ``data.dali_source_workers``, where
    -1 means 2 on a GPU rank for training (keeps the training thread free to queue kernels)
    and 0 on a CPU (the cores are busy with the model; extra processes would only compete)
    and for the eval loaders (a few batches each: spawning workers, seconds each, costs more
    than reading the bytes in the thread)."""
    workers = cfg.data.dali_source_workers
    return (2 if device.type == "cuda" and not eval_mode else 0) if workers < 0 else workers


def _build_pipeline(cfg: Config, source: _BatchSource, batch_size: int, device: torch.device, with_rgb: bool,
                    resize: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    on_gpu = device.type == "cuda"
    mean = [m * 255.0 for m in cfg.data.mean]
    std = [s * 255.0 for s in cfg.data.std]

    def geometry(x, transpose, hflip, vflip):
        if transpose:  # per-sample branch (DALI conditionals)
            x = fn.transpose(x, perm=[1, 0, 2], transpose_layout=False)  # still HWC for flip
        else:
            x = x
        return fn.flip(x, horizontal=hflip, vertical=vflip)

    workers = source_workers(cfg, device, eval_mode=with_rgb)  # with_rgb: the eval loader
    # Workers are started per pipeline (per epoch). After CUDA is initialised only spawn is
    # safe; on a CPU rank fork is, and it starts faster.
    parallel = {"parallel": True, "prefetch_queue_depth": 2} if workers else {}

    @pipeline_def(enable_conditionals=True)
    def pipeline():
        png, transpose, hflip, vflip, gain, offset, *rest = fn.external_source(
            source=source, num_outputs=source.num_outputs, batch=True, **parallel)
        extra, masks = rest[:source.num_extra], rest[source.num_extra:]
        decode_device = "mixed" if on_gpu else "cpu"
        img = fn.decoders.image(png, device=decode_device, output_type=types.RGB)
        if resize:
            img = fn.resize(img, resize_x=resize, resize_y=resize, interp_type=types.INTERP_LINEAR)
        outputs = []
        if with_rgb:
            outputs.append(fn.transpose(img, perm=[2, 0, 1]))
        img = geometry(img, transpose, hflip, vflip)
        img = fn.cast(img, dtype=types.FLOAT)
        if on_gpu:
            gain, offset = gain.gpu(), offset.gpu()
        if source.ops[0]:  # blur: the per-sample kernel of augment.blur_kernel_2d (reflect-101 borders)
            kernel = extra.pop(0)
            img = fn.filter(img, kernel.gpu() if on_gpu else kernel, border="reflect_101")
        if source.ops[1]:  # HED: log x' = A^T log x + t, per pixel (augment.hed_affine)
            log_x = dmath.log(dmath.max(img * (1.0 / 255.0), LOG_FLOOR))
            img = dmath.clamp(dmath.exp(fn.coord_transform(log_x, MT=extra.pop(0))) * 255.0, 0.0, 255.0)
        img = dmath.clamp(img * gain + offset, 0.0, 255.0)  # gain (3,) broadcasts over HWC
        outputs.insert(0, fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std))
        for mask in masks:
            mask = fn.decoders.image(mask, device=decode_device, output_type=types.GRAY)
            if resize:
                mask = fn.resize(mask, resize_x=resize, resize_y=resize, interp_type=types.INTERP_NN, antialias=False)
            outputs.append(geometry(mask, transpose, hflip, vflip))
        return tuple(outputs)

    device_id = device.index if on_gpu else None
    pool = {"py_num_workers": workers, "py_start_method": "spawn" if on_gpu else "fork"} if workers else {}
    pipe = pipeline(batch_size=max(batch_size, 1), num_threads=max(cfg.data.num_workers, 1), device_id=device_id,
                    prefetch_queue_depth=2, exec_dynamic=True, **pool)  # decode the next batch during this step
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


class DaliLoader:
    def __init__(self, cfg, reader, batches, device, params_of, masks_of=None, num_masks=0, eval_mode=False,
                 augment=None):
        self.reader, self.batches, self.device = reader, batches, torch.device(device)
        self.eval_mode, self.num_masks = eval_mode, num_masks
        self.ops = photometric_ops(augment)
        self.with_mask = eval_mode and reader.has_masks
        self.pinned = cfg.gpu.dali_pinned_copies and self.device.type == "cuda"
        self._args = (cfg, params_of, masks_of)

    def __len__(self) -> int:
        return len(self.batches)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """gpu.dali_pinned_copies: from pinned memory without blocking this (prefetch) thread on
        the training step queued on the stream; else a plain blocking copy."""
        if self.pinned:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def source(self) -> _BatchSource:
        """The external source of this loader's batches (what parallel workers run)."""
        _, params_of, masks_of = self._args
        num_masks = self.num_masks if masks_of else int(self.with_mask)
        return _BatchSource(self.reader, self.batches, params_of, num_masks, masks_of, self.with_mask, self.ops)

    def __iter__(self):
        if not self.batches:
            return
        cfg = self._args[0]
        source = self.source()
        resize = 0 if self.eval_mode else cfg.data.image_size
        pipe = _build_pipeline(cfg, source, max(len(b) for b in self.batches), self.device, self.eval_mode, resize)
        try:
            for batch in self.batches:
                outs = [_to_torch(o, self.device) for o in pipe.run()]
                index = torch.tensor(batch, dtype=torch.int64)
                labels = torch.from_numpy(np.stack([self.reader.labels(i) for i in batch]))
                out = {"image": outs.pop(0), "labels": self._to_device(labels), "index": self._to_device(index),
                       "key": [self.reader.key(i) for i in batch]}
                if self.eval_mode:
                    out["rgb"] = outs.pop(0)
                masks = [o[..., 0] for o in outs]  # uint8 class indices
                if self.with_mask:
                    out["mask"] = masks[0].to(torch.int64)
                elif masks:
                    out["masks"] = torch.stack(masks, dim=1)
                yield out
        finally:
            del pipe


def create_dali_train_loader(cfg: Config, reader: SplitReader, batches, epoch: int, device, pseudo_masks=None,
                             augment=None):
    augment = augment if augment is not None else cfg.classifier.augment

    params_of = functools.partial(sample_params, augment, cfg.seed, epoch)  # picklable for the source workers
    num_masks = len(pseudo_masks.layers) if pseudo_masks is not None else 0
    masks_of = pseudo_masks.read_pngs if pseudo_masks is not None else None
    return DaliLoader(cfg, reader, batches, device, params_of, masks_of, num_masks, augment=augment)


def create_dali_eval_loader(cfg: Config, reader: SplitReader, batches, device):
    return DaliLoader(cfg, reader, batches, device, _identity_params, eval_mode=True)
