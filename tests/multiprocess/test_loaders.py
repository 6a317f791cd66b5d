"""Loaders in one process: order, resume, global-batch invariance, joint augmentation,
exactly-once evaluation, and agreement of the torch and DALI back ends."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from loader_fixtures import RedChannelMasks, make_cfg
from PIL import Image

from mlps_dist.config import ConfigError
from mlps_dist.data.loaders import create_eval_loader, create_train_loader, steps_per_epoch
from mlps_dist.data.shards import open_split


def _keys(loader):
    return [batch["key"] for batch in loader]


def test_steps_equal_and_order_fixed_by_seed_and_epoch(tiny_shards):
    reader = open_split(tiny_shards, "train")
    cfg = make_cfg(tiny_shards)
    assert steps_per_epoch(32, 3, 2) == 5
    loaders = [create_train_loader(cfg, reader, batch_size=3, epoch=0, rank=r, world=2, device="cpu") for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 5
    epoch0 = [_keys(ld) for ld in loaders]
    assert [len(k) for k in epoch0] == [5, 5]
    seen = [key for rank in epoch0 for batch in rank for key in batch]
    assert len(seen) == len(set(seen)) == 30
    assert epoch0[0] == _keys(create_train_loader(cfg, reader, batch_size=3, epoch=0, rank=0, world=2, device="cpu"))
    assert epoch0[0] != _keys(create_train_loader(cfg, reader, batch_size=3, epoch=1, rank=0, world=2, device="cpu"))
    cfg.seed = 7
    assert epoch0[0] != _keys(create_train_loader(cfg, reader, batch_size=3, epoch=0, rank=0, world=2, device="cpu"))


def test_global_batch_is_the_same_set_for_any_world_size(tiny_shards):
    reader = open_split(tiny_shards, "train")
    cfg = make_cfg(tiny_shards)

    def global_batches(batch, world):
        per_rank = [
            _keys(create_train_loader(cfg, reader, batch_size=batch, epoch=3, rank=r, world=world, device="cpu"))
            for r in range(world)
        ]
        return [sorted(k for rank in per_rank for k in rank[s]) for s in range(len(per_rank[0]))]

    reference = global_batches(8, 1)
    assert len(reference) == 4
    assert global_batches(4, 2) == reference == global_batches(2, 4)


def test_too_few_samples_for_one_step_names_the_keys(tiny_shards):
    cfg = make_cfg(tiny_shards)
    with pytest.raises(ConfigError, match=r"batch_size.*data.root"):
        create_train_loader(
            cfg, open_split(tiny_shards, "train"), batch_size=20, epoch=0, rank=0, world=2, device="cpu"
        )


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_from_step_k_yields_the_rest_exactly(tiny_shards, backend):
    reader = open_split(tiny_shards, "train")
    cfg = make_cfg(tiny_shards, backend, workers=2 if backend == "torch" else 1, rot90=True, color_jitter=0.2)
    full = list(create_train_loader(cfg, reader, batch_size=4, epoch=2, rank=1, world=2, device="cpu"))
    rest = list(create_train_loader(cfg, reader, batch_size=4, epoch=2, start_step=2, rank=1, world=2, device="cpu"))
    assert len(full) == 4 and len(rest) == 2
    for a, b in zip(full[2:], rest):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


def _unnormalise(image, cfg):
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(3, 1, 1) * 255
    return (image * std + mean).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_masks_follow_the_image_geometry(tiny_shards, backend):
    reader = open_split(tiny_shards, "train")
    cfg = make_cfg(tiny_shards, backend, rot90=True, blur_prob=0.0)
    loader = create_train_loader(
        cfg, reader, batch_size=8, epoch=0, rank=0, world=1, device="cpu", pseudo_masks=RedChannelMasks(reader)
    )
    batch = next(iter(loader))
    assert batch["masks"].shape == (8, 2, 48, 48) and batch["masks"].dtype == torch.uint8
    red = _unnormalise(batch["image"], cfg)[:, 0].to(torch.int64)
    assert torch.equal(batch["masks"][:, 0].long(), red * 2 // 256)
    assert torch.equal(batch["masks"][:, 1].long(), red * 5 // 256)
    # and the geometry is not the identity for every sample (the test would be vacuous)
    plain = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(io.BytesIO(reader.read(int(i))["png"])))[..., 0].astype(np.int64))
            for i in batch["index"]
        ]
    )
    assert not torch.equal(plain, red)


def test_backends_agree_on_samples_labels_geometry_and_pixels(tiny_shards):
    reader = open_split(tiny_shards, "train")
    out = {}
    for backend in ("torch", "dali"):
        cfg = make_cfg(tiny_shards, backend, rot90=True, color_jitter=0.3)
        out[backend] = list(
            create_train_loader(
                cfg, reader, batch_size=4, epoch=5, rank=0, world=2, device="cpu", pseudo_masks=RedChannelMasks(reader)
            )
        )
    assert len(out["torch"]) == len(out["dali"]) == 4
    for a, b in zip(out["torch"], out["dali"]):
        assert a["key"] == b["key"] and torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["masks"], b["masks"])
        assert torch.allclose(a["image"], b["image"], atol=1e-4)


def test_resize_to_image_size_applies_to_image_and_masks(tiny_shards):
    reader = open_split(tiny_shards, "train")
    for backend in ("torch", "dali"):
        cfg = make_cfg(tiny_shards, backend, image_size=32)
        batch = next(
            iter(
                create_train_loader(
                    cfg,
                    reader,
                    batch_size=4,
                    epoch=0,
                    rank=0,
                    world=1,
                    device="cpu",
                    pseudo_masks=RedChannelMasks(reader),
                )
            )
        )
        assert batch["image"].shape == (4, 3, 32, 32) and batch["masks"].shape == (4, 2, 32, 32)
        assert int(batch["masks"][:, 1].max()) <= 4  # nearest neighbour: no new label values


@pytest.mark.parametrize("backend, workers", [("torch", 2), ("dali", 1)])
def test_eval_loader_yields_each_sample_once_across_ranks(tiny_shards, backend, workers):
    reader = open_split(tiny_shards, "val")
    cfg = make_cfg(tiny_shards, backend, workers=workers)
    for world in (1, 3, 11):
        keys, masks = [], []
        for rank in range(world):
            loader = create_eval_loader(cfg, reader, batch_size=3, rank=rank, world=world, device="cpu")
            batches = list(loader)
            assert len(batches) == len(loader)
            for batch in batches:
                keys += batch["key"]
                assert batch["rgb"].dtype == torch.uint8 and batch["mask"].dtype == torch.int64
                masks.append(batch["mask"])
        assert sorted(keys) == [reader.key(i) for i in range(8)]
        assert len(keys) == 8  # no duplicates
        assert int(torch.cat(masks).max()) <= 4


def test_eval_backends_agree(tiny_shards):
    reader = open_split(tiny_shards, "test")
    out = {
        b: list(create_eval_loader(make_cfg(tiny_shards, b), reader, batch_size=4, rank=0, world=1, device="cpu"))
        for b in ("torch", "dali")
    }
    for a, b in zip(out["torch"], out["dali"]):
        assert a["key"] == b["key"] and torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["mask"], b["mask"])
        assert torch.allclose(a["image"], b["image"], atol=1e-4) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(_unnormalise(a["image"], make_cfg(tiny_shards)), a["rgb"])


def test_mixed_patch_sizes_need_data_image_size(tiny_shards, tmp_path):
    import json
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    info = json.loads((root / "info.json").read_text())
    info["splits"]["train"]["image_size"] = None  # as make_shards records a split of mixed sizes
    (root / "info.json").write_text(json.dumps(info))
    reader = open_split(root, "train")
    with pytest.raises(ConfigError, match="data.image_size"):
        create_train_loader(make_cfg(root), reader, batch_size=4, epoch=0, rank=0, world=1, device="cpu")
    loader = create_train_loader(
        make_cfg(root, image_size=40), reader, batch_size=4, epoch=0, rank=0, world=1, device="cpu"
    )
    assert next(iter(loader))["image"].shape == (4, 3, 40, 40)


def test_dali_parallel_source_workers_yield_the_same_batches_and_the_source_pickles(tiny_shards, tmp_path):
    """data.dali_source_workers moves the external source into worker processes (fork on a
    CPU rank): same batches as the training thread reading them. On a GPU rank the workers
    are spawned, which pickles the source: it must survive that with readers and params."""
    import pickle

    reader = open_split(tiny_shards, "train")
    out = {}
    for workers in (0, 2):
        cfg = make_cfg(
            tiny_shards,
            "dali",
            rot90=True,
            color_jitter=0.3,
            hed_jitter=0.05,
            blur_prob=0.5,
            dali_source_workers=workers,
        )
        loader = create_train_loader(cfg, reader, batch_size=4, epoch=3, rank=0, world=1, device="cpu")
        out[workers] = list(loader)
    assert len(out[0]) == len(out[2]) > 1
    for a, b in zip(out[0], out[2]):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])

    from nvidia.dali.types import BatchInfo

    source = loader.loader.source()  # the DALI loader inside the background thread's wrapper
    copy = pickle.loads(pickle.dumps(source))
    for mine, theirs in zip(source(BatchInfo(1, 0)), copy(BatchInfo(1, 0))):
        assert all(np.array_equal(x, y) for x, y in zip(mine, theirs))
    with pytest.raises(StopIteration):  # DALI prefetches past the end; the source must keep saying so
        copy(BatchInfo(len(loader), 0))


def _same_batches(got, want):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a["key"] == b["key"] and torch.equal(a["index"], b["index"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["image"], b["image"])
        for key in ("masks", "mask", "rgb"):
            assert (key in a) == (key in b) and (key not in a or torch.equal(a[key], b[key])), key


@pytest.mark.parametrize("source_workers, masks", [(0, False), (1, True)])
def test_dali_pipeline_kept_for_the_run_yields_the_per_epoch_batches_and_builds_once(
    tiny_shards, source_workers, masks
):
    """gpu.dali_pipeline_per_run: one pipeline re-fed each epoch gives the batches of one built
    per epoch, over two epochs and from a resume's mid-epoch position on; the eval loader is
    built once for every validation; a pipeline left mid-epoch is not reused."""
    import gc

    from mlps_dist.data import dali_loader
    from mlps_dist.data.dali_pool import POOL

    reader, val_reader = open_split(tiny_shards, "train"), open_split(tiny_shards, "val")  # kept, as the tasks do
    pseudo = RedChannelMasks(reader) if masks else None

    def epoch(cfg, e, start=0):
        return list(
            create_train_loader(
                cfg, reader, batch_size=4, epoch=e, start_step=start, rank=1, world=2, device="cpu", pseudo_masks=pseudo
            )
        )

    def validation(cfg):
        return list(create_eval_loader(cfg, val_reader, batch_size=3, rank=0, world=1, device="cpu"))

    keys = dict(rot90=True, color_jitter=0.2, hed_jitter=0.05, blur_prob=0.5, dali_source_workers=source_workers)
    per_epoch, per_run = make_cfg(tiny_shards, "dali", **keys), make_cfg(tiny_shards, "dali", **keys)
    per_run.gpu.dali_pipeline_per_run = True
    today = {e: epoch(per_epoch, e) for e in (0, 1, 2)}
    today_val = validation(per_epoch)
    assert today[0][0]["key"] != today[1][0]["key"]  # the epochs differ: the comparison below means something

    POOL.clear()
    built = dali_loader.pipelines_built()
    _same_batches(epoch(per_run, 0), today[0])
    _same_batches(validation(per_run), today_val)
    _same_batches(epoch(per_run, 1), today[1])
    _same_batches(validation(per_run), today_val)
    assert dali_loader.pipelines_built() - built == 2  # one train pipeline, one eval pipeline

    POOL.clear()  # a rerun after a crash: a new process resumes at epoch 1, micro step 2
    built = dali_loader.pipelines_built()
    _same_batches(epoch(per_run, 1, start=2), today[1][2:])
    _same_batches(epoch(per_run, 2), today[2])
    assert dali_loader.pipelines_built() - built == 1

    left = iter(
        create_train_loader(per_run, reader, batch_size=4, epoch=3, rank=1, world=2, device="cpu", pseudo_masks=pseudo)
    )
    next(left)
    del left  # a preemption leaves epoch 3 behind mid-way
    gc.collect()
    built = dali_loader.pipelines_built()
    _same_batches(epoch(per_run, 3), epoch(per_epoch, 3))
    assert dali_loader.pipelines_built() - built == 2  # rebuilt for epoch 3, as without the key
    POOL.clear()


@pytest.mark.slow
def test_the_stage1_trainer_with_one_dali_pipeline_per_run_trains_the_same_weights(tiny_shards, tmp_path):
    """The real trainer (2 epochs, a validation after each) with gpu.dali_pipeline_per_run:
    bit-identical weights to pipelines built per epoch, from 2 pipelines instead of 4."""
    import json

    import torchrun_helpers as jobs

    blobs = {}
    for per_run in (False, True):
        cfg = tmp_path / f"per-run-{per_run}.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "run_dir": str(tmp_path / f"run-{per_run}"),
                    "seed": 1,
                    "gpu": {"dali_pipeline_per_run": per_run},
                    "data": {"root": str(tiny_shards), "num_workers": 1, "loader": "dali"},
                    "classifier": {
                        "model": "small38",
                        "epochs": 2,
                        "batch_size": 8,
                        "lr": 0.01,
                        "cam_images": 0,
                        "dropout": 0.0,
                        "pda": {"start_epoch": 1},
                        "augment": {"rot90": True, "color_jitter": 0.2},
                    },
                }
            )
        )
        done = jobs.run(
            [
                "tests/support/engine_worker.py",
                str(tmp_path / f"out-{per_run}"),
                "--task",
                "classifier",
                "--config",
                str(cfg),
            ],
            nproc=0,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:]
        blobs[per_run] = torch.load(tmp_path / f"out-{per_run}" / "weights-rank0.pt", weights_only=True)
    jobs.assert_equal_weights(blobs[True]["weights"], blobs[False]["weights"])
    assert blobs[False]["dali_pipelines_built"] == 4 and blobs[True]["dali_pipelines_built"] == 2


@pytest.mark.parametrize("backend,workers", [("torch", 1), ("dali", 1)])
def test_batches_fetched_in_the_background_equal_those_fetched_inline(tiny_shards, backend, workers):
    from mlps_dist.data.prefetch import BackgroundLoader

    reader = open_split(tiny_shards, "train")
    cfg = make_cfg(tiny_shards, backend, workers=workers, rot90=True, color_jitter=0.2)
    loader = create_train_loader(cfg, reader, batch_size=3, epoch=2, rank=0, world=1, device="cpu")
    assert isinstance(loader, BackgroundLoader) and loader.background
    background = list(loader)
    inline = list(BackgroundLoader(loader.loader, background=False))
    assert len(background) == len(inline) == len(loader) > 1
    for a, b in zip(background, inline):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    assert not create_train_loader(
        make_cfg(tiny_shards), reader, batch_size=3, epoch=2, rank=0, world=1, device="cpu"
    ).background  # num_workers 0: loading stays in the rank's loop


def test_background_loader_starts_in_iter_raises_the_loaders_error_and_stops_when_abandoned():
    import gc
    import threading
    import time

    from mlps_dist.data.prefetch import BackgroundLoader

    class Batches:
        """A generator-based loader that fails at its fourth batch and records what ran."""

        def __init__(self, fail_at=3):
            self.started = self.closed = False
            self.fail_at = fail_at

        def __len__(self):
            return 10

        def __iter__(self):
            self.started = True
            try:
                for i in range(10):
                    if i == self.fail_at:
                        raise OSError(f"shard unreadable at batch {i}")
                    yield {"i": i}
            finally:
                self.closed = True

    def prefetch_threads():
        return [t for t in threading.enumerate() if t.name == "mlps-prefetch"]

    failing = Batches()
    it = iter(BackgroundLoader(failing, background=True))
    assert failing.started  # the first batch was fetched in the caller's thread (RNG draws happen there)
    assert [next(it)["i"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="batch 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert [b["i"] for b in BackgroundLoader(Batches(fail_at=99), background=True)] == list(range(10))

    before = len(prefetch_threads())
    abandoned = Batches(fail_at=99)
    it = iter(BackgroundLoader(abandoned, background=True, depth=1))
    next(it)
    del it  # a preemption or a rollback leaves the epoch's iterator behind
    gc.collect()
    deadline = time.monotonic() + 10
    while len(prefetch_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(prefetch_threads()) <= before and abandoned.closed


ABANDON_AND_EXIT = """
import sys
from mlps_dist.config import Config
from mlps_dist.data.loaders import create_train_loader
from mlps_dist.data.shards import open_split
cfg = Config(); cfg.data.root, cfg.data.loader, cfg.data.num_workers = sys.argv[1], "dali", 1
cfg.gpu.dali_pipeline_per_run = sys.argv[2] == "per-run"
cfg.data.dali_source_workers = int(sys.argv[3])
reader = open_split(cfg.data.root, "train")
list(create_train_loader(cfg, reader, batch_size=2, epoch=9, rank=0, world=1, device="cpu"))  # kept when per-run
for epoch in range(3):  # each iterator dropped mid-epoch, its thread still running the pipeline
    batches = iter(create_train_loader(cfg, reader, batch_size=2, epoch=epoch, rank=0, world=1, device="cpu"))
    next(batches), next(batches)
print("done")
"""


def test_process_exits_cleanly_with_dali_loaders_abandoned_mid_epoch(tiny_shards):
    """Prefetch threads still inside a DALI pipeline when the interpreter exits are stopped
    before DALI's own exit handler shuts the pipelines down (otherwise: abort, status 134); a
    pipeline kept for the run (gpu.dali_pipeline_per_run, with source workers) is shut down too."""
    for lifetime, workers in (("per-epoch", "0"), ("per-run", "1")):
        proc = subprocess.run(
            [sys.executable, "-c", ABANDON_AND_EXIT, str(tiny_shards), lifetime, workers],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
