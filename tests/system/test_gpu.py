"""The CUDA paths: NCCL DDP (one and two GPUs) and DeepSpeed steps, bf16/fp16 through the stage-1
task on both back ends and through the stage-1 and stage-3 losses, SyncBatchNorm, DALI ``mixed``
decoding with every augmentation and the DALI speed keys, the mask pass against the CPU's,
resume on a GPU, and the demo on one GPU.

Every test here is marked ``gpu``: it runs with MLPS_TEST_GPU=1 where CUDA is present and is
skipped, with the reason, elsewhere (tests/conftest.py). Tests that need DeepSpeed or DALI skip
where they are not installed; tests that need two GPUs skip on one. ``bash tools/gpu_check.sh``
runs them in groups, each with its own time-out, and prints one summary line per group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchrun_helpers as jobs

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
WORKER = "tests/support/engine_worker.py"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TWO_GPUS = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 GPUs (NCCL puts one rank on each), {GPUS} visible")
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # true fp32 convolutions and matmuls in the job

# Stated tolerances (relative, autocast vs. fp32 from the same weights on the same data):
# the first step's loss (rounding only: bf16 keeps 8 mantissa bits, fp16 10) and the mean of
# the last 5 of 30 steps (GradScaler may skip a first step or two while it finds its scale).
AMP_FIRST_LOSS_RTOL = {"bf16": 0.02, "fp16": 0.005}
AMP_FINAL_LOSS_RTOL = {"bf16": 0.15, "fp16": 0.15}  # SGD on 8 patches wobbles by ~10% step to step
# Stage-1 weights after 16 steps vs fp32, global norm (measured on the CPU: bf16 3.2 %); fp16 more
# because GradScaler skips the steps whose scaled gradients overflow while it finds its scale.
AMP_WEIGHTS_RTOL = {"bf16": 0.10, "fp16": 0.20}
RESUME_WEIGHTS_RTOL = 0.01  # killed + resumed vs. uninterrupted on CUDA (bit-exact on the CPU); to be measured
MASK_MIN_EQUAL = 0.995  # share of pixels equal between the GPU and CPU mask passes, TF32 off
DALI_PNG_MAX_GREY = 0.05  # PNG: decoded alike, augmentation in float32 on the GPU (exp/log, blur)
DEMO_MIN_TEST_MIOU = 0.70  # the 2-core CPU run gives 0.79 gated; GPU arithmetic differs a little


def needs(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed in this environment")


@pytest.fixture
def fp32_reference():
    """TF32 off for this test only (true fp32 references), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _regression_config(tmp_path: Path, name: str, **section) -> str:
    values = {"epochs": 2, "batch_size": 8, "lr": 0.05, "ckpt_every_steps": 3, "log_every_steps": 1, **section}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"run_dir": str(tmp_path / name), "seed": 3, "segmenter": values}))
    return str(path)


def _train_regression(tmp_path: Path, name: str, *overrides: str, nproc: int = 1, **section) -> dict:
    cfg = _regression_config(tmp_path, name, **section)
    result = jobs.run(
        [WORKER, str(tmp_path / f"out-{name}"), "--config", cfg, "--dropout", "0", *overrides], nproc=nproc, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "on cuda:0" in result.stdout, result.stdout[-2000:]
    return torch.load(tmp_path / f"out-{name}" / "weights-rank0.pt", weights_only=True)


def _plan_gradients(tmp_path: Path, nproc: int) -> None:
    import plan_gradients

    result = jobs.run(["tests/support/dist_scripts/plan_gradients.py", str(tmp_path), "nccl"], nproc=nproc, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    reference, reference_loss = plan_gradients.single_process_gradient()
    for micro in plan_gradients.MICRO_BATCH_SIZES:
        got = torch.load(tmp_path / f"grads-w{nproc}-m{micro}.pt", weights_only=True)
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6)
        assert got["loss"] == pytest.approx(reference_loss, rel=1e-5)


def test_nccl_ddp_gradient_on_one_gpu_equals_the_single_process_gradient(tmp_path):
    """DDP over NCCL (one rank, with and without accumulation): the engine's step gives the
    gradient of the whole global batch, as over gloo in tests/multiprocess/test_batching.py."""
    _plan_gradients(tmp_path, 1)


@TWO_GPUS
def test_nccl_ddp_gradient_on_two_gpus_equals_the_single_process_gradient(tmp_path):
    _plan_gradients(tmp_path, 2)


def test_nccl_ddp_and_deepspeed_steps_on_one_gpu_agree(tmp_path):
    """One rank over NCCL: DDP, then DeepSpeed ZeRO-1 with the same SGD, schedule and data."""
    needs("deepspeed")
    ddp = _train_regression(tmp_path, "ddp", "dist.backend=nccl")["weights"]
    ds = _train_regression(
        tmp_path, "ds", "dist.backend=nccl", parallel="deepspeed", deepspeed_config="configs/deepspeed/zero1.json"
    )["weights"]
    for key in ddp:
        torch.testing.assert_close(ds[key], ddp[key], rtol=1e-4, atol=1e-5)


@TWO_GPUS
def test_nccl_ddp_and_deepspeed_zero2_on_two_gpus_agree(tmp_path):
    """Two NCCL ranks: ZeRO-2 partitions optimizer states and gradients across them and still
    ends with DDP's weights (and the ranks with each other's)."""
    needs("deepspeed")
    ddp = _train_regression(tmp_path, "ddp2", nproc=2)["weights"]
    ds = _train_regression(
        tmp_path, "zero2", nproc=2, parallel="deepspeed", deepspeed_config="configs/deepspeed/zero2.json"
    )["weights"]
    other = torch.load(tmp_path / "out-zero2" / "weights-rank1.pt", weights_only=True)["weights"]
    for key in ddp:
        torch.testing.assert_close(ds[key], ddp[key], rtol=1e-4, atol=1e-5)
        assert torch.equal(other[key], ds[key])


def test_deepspeed_bf16_runs_its_forward_in_bf16_and_refuses_fp16(tmp_path):
    """DeepSpeed switches an outer autocast off inside its forward; the torch_autocast section
    the project writes keeps bf16 on there (fp32 weights). fp16 with DeepSpeed is refused."""
    needs("deepspeed")
    blob = _train_regression(
        tmp_path, "ds-bf16", parallel="deepspeed", precision="bf16", deepspeed_config="configs/deepspeed/zero2.json"
    )
    assert blob["forward_dtype"] == "torch.bfloat16"
    assert all(v.dtype == torch.float32 for v in blob["weights"].values())
    cfg = _regression_config(tmp_path, "ds-fp16", parallel="deepspeed", precision="fp16")
    refused = jobs.run([WORKER, str(tmp_path / "out-fp16"), "--config", cfg], nproc=0, timeout=120)  # its own status
    assert refused.returncode == 2 and "precision' = fp16 with '" in refused.stdout, refused.stdout[-2000:]


def _classifier_args(
    tmp_path: Path, shards: Path, name: str, step_seconds: float = 0.0, **section
) -> tuple[list[str], Path]:
    """engine_worker's stage-1 job (small38 on the tiny shards, 8 steps per epoch) and its run dir."""
    values = {
        "model": "small38",
        "epochs": 2,
        "batch_size": 4,
        "lr": 0.01,
        "ckpt_every_steps": 3,
        "log_every_steps": 2,
        "cam_images": 0,
        "dropout": 0.0,
        "pda": {"start_epoch": 1},
        **section,
    }
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / name),
                "seed": 1,
                "data": {"root": str(shards), "num_workers": 0},
                "classifier": values,
            }
        )
    )
    args = [
        WORKER,
        str(tmp_path / f"out-{name}"),
        "--task",
        "classifier",
        "--config",
        str(cfg),
        "--step-seconds",
        str(step_seconds),
    ]
    return args, tmp_path / name


def _classifier(tmp_path, shards, name, nproc=1, env=None, **section) -> tuple[dict, list[dict]]:
    args, run_dir = _classifier_args(tmp_path, shards, name, **section)
    result = jobs.run(args, nproc=nproc, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-4000:]
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return jobs.load_weights(tmp_path / f"out-{name}" / "weights-rank0.pt"), events


def _relative_difference(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    diff = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in keys) ** 0.5
    return diff / sum(float(b[k].double().norm()) ** 2 for k in keys) ** 0.5


@pytest.fixture(scope="module")
def classifier_fp32(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("classifier_fp32")
    return _classifier(tmp, tiny_shards, "fp32", env=NO_TF32)[0]


@pytest.mark.parametrize("parallel, precision", [("ddp", "bf16"), ("ddp", "fp16"), ("deepspeed", "bf16")])
def test_amp_trains_the_classifier_task_like_fp32(tmp_path, tiny_shards, classifier_fp32, parallel, precision):
    """The real stage-1 task (BatchNorm, PDA from epoch 1, checkpoints, validation) on cuda:0
    under autocast: trains to weights within AMP_WEIGHTS_RTOL of the fp32 run, and records
    what ran."""
    if parallel == "deepspeed":
        needs("deepspeed")
    extra = (
        {"parallel": parallel, "deepspeed_config": "configs/deepspeed/zero2.json"} if parallel == "deepspeed" else {}
    )
    weights, events = _classifier(tmp_path, tiny_shards, "amp", precision=precision, **extra)
    ran = next(e for e in events if e["kind"] == "precision")
    assert ran["autocast"] == {"bf16": "bfloat16", "fp16": "float16"}[precision] and ran["device"] == "cuda:0", ran
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    off = _relative_difference(weights, classifier_fp32)
    print(f"{parallel} {precision}: weights {off:.4%} from fp32 (global norm)")
    assert 0 < off < AMP_WEIGHTS_RTOL[precision], off


def _tiny_losses(stage: str, precision: str, steps: int = 30) -> list[float]:
    """Losses of ``steps`` SGD steps through the stage's own loss on cuda:0: small38 with the
    stage-1 loss, or DeepLab-v3+ (small) with the stage-3 loss over three mask layers."""
    from types import SimpleNamespace

    from mlps_dist.config import SegmenterConfig, TrainConfig
    from mlps_dist.data import batching
    from mlps_dist.models import create_classifier, create_segmenter
    from mlps_dist.stages.train_classifier import ClassifierTask
    from mlps_dist.stages.train_segmenter import SegmenterTask
    from mlps_dist.train import parallel

    device = torch.device("cuda", 0)
    cfg = TrainConfig(batch_size=8, lr=0.01, precision=precision)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(8, 3, 64, 64, generator=gen).to(device),
        "labels": (torch.rand(8, 4, generator=gen) < 0.5).float().to(device),
        "masks": torch.randint(0, 5, (8, 3, 64, 64), generator=gen, dtype=torch.uint8).to(device),
    }
    torch.manual_seed(0)
    if stage == "classifier":
        network, task, loss_of = create_classifier("small38", 4, dropout=0.0), None, ClassifierTask.loss
    else:
        network, loss_of = create_segmenter("deeplabv3plus_small", 4, ""), SegmenterTask.loss
        task = SimpleNamespace(section=SegmenterConfig(), layer_slots=[0, 1, 2], ignore_index=4)
    model = parallel.wrap(network, cfg, plan=batching.plan_batches(cfg, 1), total_steps=steps, device=device)
    if precision == "fp16":
        assert model.scaler.is_enabled()
    model.train()
    losses = []
    for _ in range(steps):
        with model.autocast():
            loss = loss_of(task, model, batch)  # the trainer's own loss
        assert loss.dtype == torch.float32
        model.backward(loss, boundary=True)
        model.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("stage", ["classifier", "segmenter"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_reaches_the_fp32_loss(stage, precision, fp32_reference):
    reference = _tiny_losses(stage, "fp32")
    amp = _tiny_losses(stage, precision)
    assert all(np.isfinite(amp))
    assert amp[-1] < 0.9 * amp[0] and reference[-1] < 0.9 * reference[0]  # both train
    assert abs(amp[0] - reference[0]) <= AMP_FIRST_LOSS_RTOL[precision] * reference[0], (reference, amp)
    tail_ref, tail_amp = np.mean(reference[-5:]), np.mean(amp[-5:])
    assert abs(tail_amp - tail_ref) <= AMP_FINAL_LOSS_RTOL[precision] * tail_ref, (reference, amp)


def _bn_statistics(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_frozen_sync_batchnorm_statistics_survive_training_steps(freeze_bn):
    """SyncBatchNorm (as on several GPUs) with freeze_bn keeps ImageNet's statistics; the
    unfrozen control shows the steps would have changed them."""
    from mlps_dist.models import create_classifier

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = create_classifier("small38", 4, freeze_bn=freeze_bn, dropout=0.0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    before = _bn_statistics(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _step in range(3):
        images = torch.randn(4, 3, 64, 64, device=device) * 2 + 1
        loss = F.multilabel_soft_margin_loss(model(images), torch.ones(4, 4, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _bn_statistics(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert (changed == []) if freeze_bn else changed, changed


@TWO_GPUS
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_sync_batchnorm_on_two_gpus_keeps_the_ranks_equal(tmp_path, tiny_shards, freeze_bn):
    """Two NCCL ranks of the stage-1 task: SyncBatchNorm where BN trains, frozen statistics
    untouched otherwise; both ranks end with the same weights and statistics."""
    _classifier(tmp_path, tiny_shards, "sync", nproc=2, freeze_bn=freeze_bn)
    rank0, rank1 = (jobs.load_weights(tmp_path / "out-sync" / f"weights-rank{r}.pt") for r in (0, 1))
    jobs.assert_equal_weights(rank0, rank1)
    means = [v for k, v in rank0.items() if k.endswith("running_mean")]
    assert all(torch.equal(m, torch.zeros_like(m)) for m in means) == freeze_bn


def _loader_outputs(cfg, reader, backend: str, device, **kwargs) -> list[dict]:
    from mlps_dist.data.loaders import create_eval_loader, create_train_loader

    cfg.data.loader = backend
    if kwargs.pop("eval", False):
        loader = create_eval_loader(cfg, reader, batch_size=4, rank=0, world=1, device=device)
    else:
        loader = create_train_loader(
            cfg,
            reader,
            batch_size=4,
            epoch=kwargs.pop("epoch", 3),
            rank=0,
            world=1,
            device=device,
            augment=cfg.segmenter.augment,
            **kwargs,
        )
    return [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for b in loader]


@pytest.mark.parametrize(
    "image_format, kind", [("png", "train"), ("jpeg", "train"), ("png", "masks"), ("png", "eval"), ("jpeg", "eval")]
)
def test_dali_mixed_decoding_and_gpu_augmentation_match_the_torch_loader(
    tiny_luad_folder, tmp_path, image_format, kind
):
    """Same samples and the same per-sample parameters (augment.py: flips, transposes, colour,
    HED stain jitter, blur) in both back ends; with pseudo masks (geometry only) and through
    the eval loader. PNG: DALI decodes on the CPU and augments on the GPU, the same pixels
    within DALI_PNG_MAX_GREY grey levels. JPEG: nvJPEG and libjpeg-turbo may round the inverse
    DCT differently: within a grey level on average."""
    needs("nvidia.dali")
    from loader_fixtures import RedChannelMasks

    from mlps_dist.config import Config
    from mlps_dist.data.ingest import build_plan, write_plan
    from mlps_dist.data.layouts import LUAD
    from mlps_dist.data.shards import open_split

    root = tmp_path / "shards"
    write_plan(build_plan(LUAD, tiny_luad_folder, shard_size=10), root, log=lambda *_: None, image_format=image_format)
    cfg = Config()
    cfg.data.root, cfg.data.num_workers = str(root), 2
    augment = cfg.segmenter.augment
    augment.hflip = augment.vflip = augment.rot90 = True
    augment.color_jitter, augment.hed_jitter, augment.hed_shift, augment.blur_prob = 0.2, 0.05, 0.02, 0.5
    reader = open_split(root, "val" if kind == "eval" else "train")
    extra = {"eval": True} if kind == "eval" else {"pseudo_masks": RedChannelMasks(reader)} if kind == "masks" else {}
    torch_batches = _loader_outputs(cfg, reader, "torch", "cpu", **dict(extra))
    dali_batches = _loader_outputs(cfg, reader, "dali", torch.device("cuda", 0), **dict(extra))
    assert [b["key"] for b in torch_batches] == [b["key"] for b in dali_batches]
    grey = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255.0  # one grey level in normalised units
    for t, d in zip(torch_batches, dali_batches):
        torch.testing.assert_close(d["labels"], t["labels"])
        for key in ("masks", "mask"):
            if key in t and image_format == "png":
                assert torch.equal(d[key], t[key]), key
        diff = ((d["image"] - t["image"]).abs() * grey).float()  # in grey levels
        if image_format == "png":
            assert diff.max() < DALI_PNG_MAX_GREY, float(diff.max())
        else:
            assert diff.mean() < 1.0 and torch.quantile(diff.flatten(), 0.999) <= 8, float(diff.mean())


def test_dali_pinned_copies_yield_the_same_batches(tiny_shards):
    """gpu.dali_pinned_copies: labels and indices from pinned memory without blocking the
    prefetch thread; the same batches as the blocking copies."""
    needs("nvidia.dali")
    from mlps_dist.config import Config
    from mlps_dist.data.shards import open_split

    reader = open_split(tiny_shards, "train")
    out, wait = {}, {}
    for pinned in (False, True):
        cfg = Config()
        cfg.data.root, cfg.gpu.dali_pinned_copies = str(tiny_shards), pinned
        out[pinned] = _loader_outputs(cfg, reader, "dali", torch.device("cuda", 0))
        wait[pinned] = _data_wait_ms(cfg, reader)
    for a, b in zip(out[False], out[True]):
        assert a["key"] == b["key"] and torch.equal(a["labels"], b["labels"]) and torch.equal(a["index"], b["index"])
        assert torch.equal(a["image"], b["image"])
    print(
        f"DALI data wait behind a queued GPU step: {wait[False]:.2f} ms per batch with blocking copies, "
        f"{wait[True]:.2f} ms with gpu.dali_pinned_copies"
    )


def _data_wait_ms(cfg, reader, step_matmuls: int = 40) -> float:
    """Mean time next() waits for a batch while each step queues GPU work (matmuls) and moves
    on without synchronising, as the trainer does: the cost of copies that block the prefetch
    thread behind that work."""
    import time

    from mlps_dist.data.loaders import create_train_loader

    device = torch.device("cuda", 0)
    work = torch.randn(2048, 2048, device=device)
    loader = create_train_loader(cfg, reader, batch_size=2, epoch=0, rank=0, world=1, device=device)
    waits, batches = [], iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        waits.append(time.perf_counter() - start)
        if batch is None:
            break
        for _ in range(step_matmuls):
            work = torch.tanh(work @ work * 1e-3)
    torch.cuda.synchronize(device)
    return 1000 * sum(waits[1:-1]) / max(len(waits) - 2, 1)  # the first and the end-of-epoch waits are no step's


def test_dali_pipeline_per_run_yields_the_same_batches_and_saves_the_builds(tiny_shards):
    """gpu.dali_pipeline_per_run on cuda:0 with spawned source workers (the default there):
    two epochs from one pipeline equal two epochs from one pipeline each; prints the time of
    both (what the key's default is chosen from)."""
    needs("nvidia.dali")
    import time

    from mlps_dist.config import Config
    from mlps_dist.data import dali_loader
    from mlps_dist.data.dali_pool import POOL
    from mlps_dist.data.shards import open_split

    reader = open_split(tiny_shards, "train")
    out, seconds, builds = {}, {}, {}
    for per_run in (False, True):
        cfg = Config()
        cfg.data.root, cfg.gpu.dali_pipeline_per_run = str(tiny_shards), per_run
        POOL.clear()
        built, start = dali_loader.pipelines_built(), time.perf_counter()
        out[per_run] = [
            b for epoch in (3, 4) for b in _loader_outputs(cfg, reader, "dali", torch.device("cuda", 0), epoch=epoch)
        ]
        seconds[per_run], builds[per_run] = time.perf_counter() - start, dali_loader.pipelines_built() - built
    POOL.clear()
    for a, b in zip(out[False], out[True], strict=True):
        assert a["key"] == b["key"] and torch.equal(a["labels"], b["labels"]) and torch.equal(a["image"], b["image"])
    assert builds == {False: 2, True: 1}, builds
    print(
        f"DALI 2 epochs: {seconds[False]:.1f} s with a pipeline built per epoch, {seconds[True]:.1f} s with one "
        f"per run (gpu.dali_pipeline_per_run)"
    )


def test_mask_pass_on_gpu_matches_the_cpu_masks(tiny_shards, tmp_path):
    """The same classifier weights and patches: stage 2 on cuda:0 (TF32 off) vs. on the CPU,
    equal on at least MASK_MIN_EQUAL of the pixels (Grad-CAM near-ties may flip a few under
    another summation order)."""
    import yaml

    from mlps_dist.data.pseudo_masks import PseudoMaskStore
    from mlps_dist.data.shards import open_split
    from mlps_dist.models import create_classifier
    from mlps_dist.train.checkpoint import save_model_file

    classes = open_split(tiny_shards, "train").classes
    torch.manual_seed(0)
    weights = create_classifier("small38", len(classes)).state_dict()
    masks = {}
    for where in ("cpu", "gpu"):
        run = tmp_path / where
        save_model_file(
            run / "classifier" / "model.pt",
            weights,
            {"name": "small38", "num_classes": len(classes), "classes": list(classes), "config": {}},
        )
        (run / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "run_dir": str(run),
                    "data": {"root": str(tiny_shards), "num_workers": 0},
                    "masks": {"chunk_size": 4, "batch_size": 4},
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **NO_TF32}
        if where == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        done = subprocess.run(
            [sys.executable, "-m", "mlps_dist.stages.generate_masks", "--config", str(run / "config.yaml")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        store = PseudoMaskStore(run / "pseudo_masks" / "train")
        masks[where] = np.stack([np.stack(store.read_masks(i)) for i in range(len(open_split(tiny_shards, "train")))])
    equal = float((masks["cpu"] == masks["gpu"]).mean())
    print(f"mask pass: {equal:.4%} of the pixels equal on GPU and CPU")
    assert equal >= MASK_MIN_EQUAL, equal


def test_resume_on_gpu_continues_the_same_steps_to_weights_within_tolerance(tmp_path, tiny_shards):
    """Killed (SIGKILL) mid-epoch and relaunched on cuda:0: the same data order and counters
    (global step, PDA gamma) as an uninterrupted run, and weights within RESUME_WEIGHTS_RTOL
    (CUDA kernels are not bit-reproducible: cuDNN algorithms, atomics in backward passes)."""
    reference, _ = _classifier(tmp_path, tiny_shards, "whole", env=NO_TF32)
    args, run_dir = _classifier_args(tmp_path, tiny_shards, "resumed", step_seconds=0.25)
    checkpoints = run_dir / "classifier" / "checkpoints"
    job = jobs.start(args, nproc=1, env=NO_TF32)
    jobs.wait_for(
        lambda: 0 < jobs.latest_step(checkpoints) < 16 and jobs.latest_step(checkpoints) % 8,
        job,
        "a mid-epoch checkpoint",
        timeout=180,
    )
    jobs.kill_job(job)
    killed_at = jobs.latest_step(checkpoints)
    again = jobs.run(args, nproc=1, timeout=300, env=NO_TF32)
    assert again.returncode == 0 and f"step-{killed_at:08d}" in again.stdout, again.stdout[-3000:]
    resumed = torch.load(tmp_path / "out-resumed" / "weights-rank0.pt", weights_only=True)
    whole = torch.load(tmp_path / "out-whole" / "weights-rank0.pt", weights_only=True)
    assert resumed["task"] == whole["task"]  # PDA gamma of the last epoch
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert max(e.get("global_step", 0) for e in events if e["kind"] == "checkpoint") == 16
    off = _relative_difference(resumed["weights"], reference)
    largest = max(float((resumed["weights"][k].double() - reference[k].double()).abs().max()) for k in reference)
    print(
        f"resume on GPU (killed at step {killed_at}): weights {off:.3e} from the uninterrupted run "
        f"(global norm), largest difference {largest:.3e}"
    )
    assert off < RESUME_WEIGHTS_RTOL, off


@pytest.mark.slow
def test_demo_pipeline_on_one_gpu(tmp_path):
    env = {**os.environ, "DEMO_DATA": str(tmp_path / "data"), "NPROC_PER_NODE": "1"}
    done = subprocess.run(
        ["bash", "launch/demo.sh", str(tmp_path / "run")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    test = json.loads((tmp_path / "run" / "metrics" / "test.json").read_text())
    print(f"demo test mIoU (gated) {test['miou']:.4f}")
    assert test["miou"] >= DEMO_MIN_TEST_MIOU, test
