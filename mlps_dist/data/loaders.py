"""The two loader entry points; ``data.loader`` picks the back end (torch | dali).

Both back ends take their batches from sampling.py and their augmentation parameters from
augment.py, so they yield the same samples in the same order with the same geometry.
"""

from __future__ import annotations

from mlps_dist import dist
from mlps_dist.config import Config, ConfigError
from mlps_dist.data.batching import BatchPlan, rank_micro_batches
from mlps_dist.data.prefetch import BackgroundLoader
from mlps_dist.data.sampling import eval_batches, permutation, steps_per_epoch
from mlps_dist.data.shards import SplitReader

__all__ = ["create_train_loader", "create_eval_loader", "create_masks_loader", "split_batches", "steps_per_epoch"]


def create_train_loader(
    cfg: Config,
    reader: SplitReader,
    *,
    batch_size: int = 0,
    epoch: int,
    start_step: int = 0,
    rank: int,
    world: int,
    device,
    pseudo_masks=None,
    plan: BatchPlan | None = None,
    augment=None,
):
    """Training batches of this rank for ``epoch`` from (micro) step ``start_step`` on;
    ``len()`` = the remaining micro steps, equal on every rank. ``plan`` (batching.py) gives
    the micro batches of a global batch split over ranks and accumulation, uneven where it
    does not divide; ``batch_size`` alone means ``batch_size`` samples on each rank.
    ``augment``: the stage's augment section (default: segmenter.augment with pseudo masks,
    classifier.augment without)."""
    if augment is None:
        augment = cfg.segmenter.augment if pseudo_masks is not None else cfg.classifier.augment
    plan = plan or BatchPlan(batch_size * world, batch_size, 1, world)
    if plan.steps_per_epoch(len(reader)) == 0:
        raise ConfigError(
            f"the global batch of {plan.global_batch} samples ('classifier.batch_size' or 'segmenter.batch_size') "
            f"is more than the {len(reader)} training samples in 'data.root' ({cfg.data.root}); lower the "
            f"batch_size or point data.root at a larger dataset"
        )
    if reader.split_info.get("image_size") is None and not cfg.data.image_size:
        raise ConfigError(
            f"the '{reader.split}' patches in data.root ({cfg.data.root}) differ in size; set "
            f"'data.image_size' (e.g. data.image_size=224) so that they can be batched"
        )
    missing = pseudo_masks.missing(len(reader)) if pseudo_masks is not None else []
    if missing:
        raise ValueError(
            f"pseudo masks cover {len(reader) - len(missing)} of {len(reader)} training samples "
            f"(first missing: {missing[:5]}); finish stage 2 (mlps_dist.stages.generate_masks) first"
        )
    if cfg.data.loader == "dali":
        from mlps_dist.data.dali_loader import create_dali_train_loader

        # The same batches, from a schedule a pipeline kept for the run can follow (dali_source.py).
        loader = create_dali_train_loader(cfg, reader, plan, rank, epoch, start_step, device, pseudo_masks, augment)
    else:
        batches = rank_micro_batches(permutation(len(reader), cfg.seed, epoch), plan, rank, start_step)
        from mlps_dist.data.sample_errors import NamedSampleErrors
        from mlps_dist.data.torch_loader import TrainDataset, create_torch_loader

        loader = create_torch_loader(
            NamedSampleErrors(TrainDataset(cfg, reader, epoch, pseudo_masks, augment), reader),
            batches,
            cfg.data.num_workers,
            device,
        )
    # Hand-over off the step's critical path, except where loading is meant to stay in the
    # rank's own loop (the torch loader without workers).
    background = cfg.data.loader == "dali" or cfg.data.num_workers > 0
    return BackgroundLoader(loader, background=background, device=device)


def create_eval_loader(
    cfg: Config, reader: SplitReader, *, batch_size: int, rank: int, world: int, device, skip_bad: bool = False
):
    """Every sample of the split exactly once across ranks (and workers); a rank with no
    share yields zero batches. ``skip_bad`` (torch loader): a sample that cannot be decoded
    is named in a warning and blanked (``batch["bad"]``, torch_loader.EvalDataset)."""
    batches = split_batches(reader, dist.partition(len(reader), world, rank), batch_size)
    if cfg.data.loader == "dali":
        from mlps_dist.data.dali_loader import create_dali_eval_loader

        return create_dali_eval_loader(cfg, reader, batches, device)
    from mlps_dist.data.torch_loader import EvalDataset, create_torch_loader

    # A sample that cannot be decoded stops the pass naming its shard and key (exit 2).
    return create_torch_loader(EvalDataset(cfg, reader, skip_bad=skip_bad), batches, cfg.data.num_workers, device)


def create_masks_loader(cfg: Config, reader: SplitReader, batches: list[list[int]], device, skip_bad: bool):
    """The mask pass's samples in the given batches (torch_loader.EvalDataset, ``purpose="masks"``),
    with the torch back end whatever data.loader says: the pass checks every sample's labels
    and size, and names or skips a bad one (``masks.skip_bad``). Workers decode 4 batches
    ahead while the model runs."""
    from mlps_dist.data.torch_loader import EvalDataset, create_torch_loader

    dataset = EvalDataset(cfg, reader, skip_bad=skip_bad, purpose="masks")
    return create_torch_loader(dataset, batches, cfg.data.num_workers, device, prefetch_factor=4)


def split_batches(reader: SplitReader, indices, batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``indices`` (sampling.eval_batches); one sample per batch where
    the split's patches differ in size (info.json has no common image_size): they cannot be stacked."""
    return eval_batches(indices, batch_size if reader.split_info.get("image_size") else 1)
