"""DALI back end: our sampler feeds encoded PNG bytes and augmentation parameters through
``fn.external_source``; DALI decodes, transforms and normalises.

DALI's own webdataset reader shuffles with internal state that cannot resume in the middle
of an epoch, so the order comes from sampling.py, as in the torch back end, and the
per-sample parameters from augment.py: both back ends yield the same samples with the
same geometry. Decoding uses ``device="mixed"`` when the rank has a GPU: JPEG shards
(``mlps shards --image-format jpeg``) are decoded by nvJPEG on the GPU, PNG and WebP by
DALI's CPU threads; augmentation then runs on the GPU. Without a GPU everything runs on the
CPU. The pipeline prefetches two batches, so decoding overlaps the training step. The
Python source only reads bytes and draws parameters (decoding happens in DALI's threads,
outside the GIL); on a GPU rank it runs in parallel worker processes
(``data.dali_source_workers``), so the training thread never does even that.

A pipeline is built per epoch and per validation, or, with ``gpu.dali_pipeline_per_run``,
once per run and re-fed each epoch (dali_source.py maps DALI's epoch number to the training
epoch; dali_pool.py keeps it between epochs): the same batches either way.
"""

from __future__ import annotations

import numpy as np
import torch

from mlps_dist.config import Config
from mlps_dist.data.augment import LOG_FLOOR, photometric_ops
from mlps_dist.data.batching import BatchPlan
from mlps_dist.data.dali_pool import POOL
from mlps_dist.data.dali_source import BatchSource, FixedSchedule, TrainSchedule
from mlps_dist.data.shards import SplitReader

_built = 0  # pipelines built in this process (gpu.dali_pipeline_per_run: one per loader kind)


def pipelines_built() -> int:
    return _built


def source_workers(cfg: Config, device: torch.device, eval_mode: bool = False) -> int:
    """Python processes for the parallel external source: ``data.dali_source_workers``, where
    -1 means 2 on a GPU rank for training (keeps the training thread free to queue kernels)
    and 0 on a CPU (the cores are busy with the model; extra processes would only compete)
    and for the eval loaders (a few batches each: spawning workers, seconds each, costs more
    than reading the bytes in the thread)."""
    workers = cfg.data.dali_source_workers
    return (2 if device.type == "cuda" and not eval_mode else 0) if workers < 0 else workers


def _build_pipeline(
    cfg: Config, source: BatchSource, batch_size: int, device: torch.device, with_rgb: bool, resize: int
):
    global _built
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
    # Workers are started per pipeline (per epoch, or per run with gpu.dali_pipeline_per_run).
    # After CUDA is initialised only spawn is safe; on a CPU rank fork is, and it starts faster.
    parallel = {"parallel": True, "prefetch_queue_depth": 2} if workers else {}

    @pipeline_def(enable_conditionals=True)
    def pipeline():
        png, transpose, hflip, vflip, gain, offset, *rest = fn.external_source(
            source=source, num_outputs=source.num_outputs, batch=True, batch_info=True, **parallel
        )
        extra, masks = rest[: source.num_extra], rest[source.num_extra :]
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
    pipe = pipeline(
        batch_size=max(batch_size, 1),
        num_threads=max(cfg.data.num_workers, 1),
        device_id=device_id,
        prefetch_queue_depth=2,
        exec_dynamic=True,
        **pool,
    )  # decode the next batch during this step
    pipe.build()
    _built += 1
    return pipe


def _epoch_ended(pipe) -> bool:
    """After the epoch's last batch: the source has said StopIteration, so one more ``run()``
    raises it without scheduling anything; then ``reset()`` starts the pipeline's next epoch.
    False (the pipeline is out of step with its schedule) where ``run()`` still returns data."""
    try:
        pipe.run()
    except StopIteration:
        pipe.reset()
        return True
    return False


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


class DaliLoader:
    """One epoch of ``schedule`` (dali_source.py) as batches of torch tensors on ``device``."""

    def __init__(self, cfg, reader, schedule, device, masks_of=None, num_masks=0, eval_mode=False, augment=None):
        self.cfg, self.reader, self.schedule, self.device = cfg, reader, schedule, torch.device(device)
        self.batches = schedule.batches(0)
        self.eval_mode, self.num_masks, self.masks_of = eval_mode, num_masks, masks_of
        self.ops = photometric_ops(augment)
        self.with_mask = eval_mode and reader.has_masks
        self.pinned = cfg.gpu.dali_pinned_copies and self.device.type == "cuda"
        self.per_run = bool(cfg.gpu.dali_pipeline_per_run)
        self.resize = 0 if eval_mode else cfg.data.image_size

    def __len__(self) -> int:
        return len(self.batches)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """gpu.dali_pinned_copies: from pinned memory without blocking this (prefetch) thread on
        the training step queued on the stream; else a plain blocking copy."""
        if self.pinned:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def source(self) -> BatchSource:
        """The external source of this loader's batches (what parallel workers run)."""
        num_masks = self.num_masks if self.masks_of else int(self.with_mask)
        return BatchSource(self.reader, self.schedule, num_masks, self.masks_of, self.with_mask, self.ops)

    def pool_key(self) -> tuple:
        """Everything the pipeline and its source are built from, apart from the epoch it starts
        at. The reader and mask store by identity: the pooled source holds them, so no other
        object can take their ids while the pipeline is kept."""
        data = self.cfg.data
        masks_owner = getattr(self.masks_of, "__self__", self.masks_of)
        return (
            self.schedule.identity(),
            id(self.reader),
            id(masks_owner),
            self.num_masks,
            str(self.device),
            self.eval_mode,
            self.resize,
            self.ops,
            tuple(data.mean),
            tuple(data.std),
            data.num_workers,
            source_workers(self.cfg, self.device, eval_mode=self.eval_mode),
        )

    def _pipeline(self):
        """(pipeline, schedule, k): the pool's where gpu.dali_pipeline_per_run has one for this
        epoch, else a new one reading this loader's schedule from its epoch 0."""
        if self.per_run:
            entry = POOL.take(self.pool_key(), self.schedule)
            if entry is not None:
                return entry
        pipe = _build_pipeline(
            self.cfg, self.source(), self.schedule.max_batch(), self.device, self.eval_mode, self.resize
        )
        return pipe, self.schedule, 0

    def __iter__(self):
        if not self.batches:
            return
        pipe, schedule, k = self._pipeline()
        last = len(self.batches) - 1
        try:
            for step, batch in enumerate(self.batches):
                try:
                    outs = [_to_torch(o, self.device) for o in pipe.run()]
                except RuntimeError as exc:  # DALI's decoder names no sample: find it (prefetched batches too)
                    raise (
                        undecodable_sample(self.reader, self.batches[step : step + 3], self.eval_mode) or exc
                    ) from None
                if step == last and self.per_run and _epoch_ended(pipe):
                    # Handed back before the last batch is yielded: the next epoch's loader
                    # may ask for it as soon as the training loop has this batch.
                    POOL.give_back(self.pool_key(), pipe, schedule, k + 1)
                index = torch.tensor(batch, dtype=torch.int64)
                labels = torch.from_numpy(np.stack([self.reader.labels(i) for i in batch]))
                out = {
                    "image": outs.pop(0),
                    "labels": self._to_device(labels),
                    "index": self._to_device(index),
                    "key": [self.reader.key(i) for i in batch],
                }
                if self.eval_mode:
                    out["rgb"] = outs.pop(0)
                masks = [o[..., 0] for o in outs]  # uint8 class indices
                if self.with_mask:
                    out["mask"] = masks[0].to(torch.int64)
                elif masks:
                    out["masks"] = torch.stack(masks, dim=1)
                yield out
        finally:
            del pipe  # kept by the pool after a clean epoch end; dropped when left mid-epoch


def undecodable_sample(reader: SplitReader, batches, eval_mode: bool):
    """SampleError naming the first sample of ``batches`` whose shard members Pillow cannot
    decode either (one line, exit 2, as the torch loader reports it), or None."""
    from mlps_dist.data.decode import decode_sample
    from mlps_dist.data.sample_errors import DECODE_ERRORS, SampleError

    for index in (i for batch in batches for i in batch):
        try:
            decode_sample(reader.read(index))
        except DECODE_ERRORS as exc:
            detail = " ".join(str(exc).split())[:200] or type(exc).__name__
            fix = (
                f"{reader.location(index)} cannot be decoded ({type(exc).__name__}: {detail}); rerun "
                f"mlps shards on its source (fix or remove the file)"
            )
            return SampleError(
                f"{fix}, or set evaluate.skip_bad=true with data.loader=torch to leave it out of the metrics"
                if eval_mode
                else f"{fix}; training does not skip samples"
            )
    return None


def create_dali_train_loader(
    cfg: Config,
    reader: SplitReader,
    plan: BatchPlan,
    rank: int,
    epoch: int,
    start_micro: int,
    device,
    pseudo_masks=None,
    augment=None,
):
    augment = augment if augment is not None else cfg.classifier.augment
    schedule = TrainSchedule(len(reader), cfg.seed, plan, rank, augment, epoch, start_micro)
    num_masks = len(pseudo_masks.layers) if pseudo_masks is not None else 0
    masks_of = pseudo_masks.read_pngs if pseudo_masks is not None else None
    return DaliLoader(cfg, reader, schedule, device, masks_of, num_masks, augment=augment)


def create_dali_eval_loader(cfg: Config, reader: SplitReader, batches, device):
    return DaliLoader(cfg, reader, FixedSchedule(batches), device, eval_mode=True)
