"""The CUDA paths: NCCL DDP and DeepSpeed steps, bf16/fp16 autocast, frozen SyncBatchNorm,
DALI ``mixed`` decoding with GPU augmentation, the mask pass and the demo on one GPU.

Every test here is marked ``gpu``: it runs wherever CUDA is present and is skipped, with the
reason, elsewhere (tests/conftest.py). ``bash tools/gpu_check.sh`` runs this tier plus the GPU
benchmarks and prints one summary line per check.
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

REPO = Path(__file__).resolve().parents[1]
WORKER = "tests/engine_worker.py"

# Stated tolerances (relative, autocast vs. fp32 from the same weights on the same data):
# the first step's loss (rounding only: bf16 keeps 8 mantissa bits, fp16 10) and the mean of
# the last 5 of 30 steps (GradScaler may skip a first step or two while it finds its scale).
AMP_FIRST_LOSS_RTOL = {"bf16": 0.02, "fp16": 0.005}
AMP_FINAL_LOSS_RTOL = {"bf16": 0.15, "fp16": 0.15}  # SGD on 8 patches wobbles by ~10% step to step
DEMO_MIN_TEST_MIOU = 0.70  # the 2-core CPU run gives 0.79 gated; GPU arithmetic differs a little


def _regression_config(tmp_path: Path, name: str, **section) -> str:
    values = {"epochs": 2, "batch_size": 8, "lr": 0.05, "ckpt_every_steps": 3, "log_every_steps": 1, **section}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"run_dir": str(tmp_path / name), "seed": 3, "segmenter": values}))
    return str(path)


def _train_regression(tmp_path: Path, name: str, *overrides: str, **section) -> dict:
    cfg = _regression_config(tmp_path, name, **section)
    result = jobs.run([WORKER, str(tmp_path / f"out-{name}"), "--config", cfg, "--dropout", "0", *overrides],
                      nproc=1, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "on cuda:0" in result.stdout, result.stdout[-2000:]
    return jobs.load_weights(tmp_path / f"out-{name}" / "weights-rank0.pt")


def test_nccl_ddp_gradient_on_one_gpu_equals_the_single_process_gradient(tmp_path):
    """DDP over NCCL (one rank, with and without accumulation): the engine's step gives the
    gradient of the whole global batch, as over gloo in tests/test_batching.py."""
    from test_batching import _single_process_gradient

    import plan_gradients

    result = jobs.run(["tests/dist_scripts/plan_gradients.py", str(tmp_path), "nccl"], nproc=1, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    reference, reference_loss = _single_process_gradient()
    for micro in plan_gradients.MICRO_BATCH_SIZES:
        got = torch.load(tmp_path / f"grads-w1-m{micro}.pt", weights_only=True)
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6)
        assert got["loss"] == pytest.approx(reference_loss, rel=1e-5)


def test_nccl_ddp_and_deepspeed_steps_on_one_gpu_agree(tmp_path):
    """One rank over NCCL: DDP, then DeepSpeed ZeRO-1 with the same SGD, schedule and data."""
    ddp = _train_regression(tmp_path, "ddp", "dist.backend=nccl")
    ds = _train_regression(tmp_path, "ds", "dist.backend=nccl", parallel="deepspeed",
                           deepspeed_config="configs/deepspeed/zero1.json")
    for key in ddp:
        torch.testing.assert_close(ds[key], ddp[key], rtol=1e-4, atol=1e-5)


def _tiny_classifier_losses(precision: str, steps: int = 30) -> list[float]:
    """Losses of ``steps`` SGD steps of small38 on fixed random patches, on cuda:0."""
    from mlps_dist import parallel
    from mlps_dist.config import TrainConfig
    from mlps_dist.models import create_classifier

    device = torch.device("cuda", 0)
    cfg = TrainConfig(batch_size=8, lr=0.01, precision=precision)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=gen).to(device)
    labels = (torch.rand(8, 4, generator=gen) < 0.5).float().to(device)
    torch.manual_seed(0)
    model = parallel.wrap(create_classifier("small38", 4, dropout=0.0), cfg,
                          plan=parallel.plan_batches(cfg, 1), total_steps=steps, device=device)
    if precision == "fp16":
        assert model.scaler.is_enabled()
    model.train()
    losses = []
    for _ in range(steps):
        with model.autocast():
            loss = F.multilabel_soft_margin_loss(model(images).float(), labels)
        model.backward(loss, boundary=True)
        model.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_reaches_the_fp32_loss(precision):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    reference = _tiny_classifier_losses("fp32")
    amp = _tiny_classifier_losses(precision)
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
    for step in range(3):
        images = torch.randn(4, 3, 64, 64, device=device) * 2 + 1
        loss = F.multilabel_soft_margin_loss(model(images), torch.ones(4, 4, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _bn_statistics(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert (changed == []) if freeze_bn else changed, changed


def _loader_outputs(cfg, reader, backend: str, device) -> list[dict]:
    from mlps_dist.data.loaders import create_train_loader

    cfg.data.loader = backend
    loader = create_train_loader(cfg, reader, batch_size=4, epoch=3, rank=0, world=1, device=device)
    return [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in b.items()} for b in loader]


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_dali_mixed_decoding_and_gpu_augmentation_match_the_torch_loader(tiny_luad_folder, tmp_path, image_format):
    """Same samples, same per-sample flips/transposes/colour parameters (augment.py) in both
    back ends. PNG: DALI decodes on the CPU, augments on the GPU: the same numbers up to float
    rounding. JPEG: nvJPEG and libjpeg-turbo may round the inverse DCT differently: the same
    pixels within a grey level on average."""
    from mlps_dist.config import Config
    from mlps_dist.data.ingest import build_plan, write_plan
    from mlps_dist.data.layouts import LUAD
    from mlps_dist.data.shards import open_split

    root = tmp_path / "shards"
    write_plan(build_plan(LUAD, tiny_luad_folder, shard_size=10), root, log=lambda *_: None, image_format=image_format)
    cfg = Config()
    cfg.data.root, cfg.data.num_workers, cfg.data.rot90, cfg.data.color_jitter = str(root), 2, True, 0.2
    reader = open_split(root, "train")
    torch_batches = _loader_outputs(cfg, reader, "torch", "cpu")
    dali_batches = _loader_outputs(cfg, reader, "dali", torch.device("cuda", 0))
    assert [b["key"] for b in torch_batches] == [b["key"] for b in dali_batches]
    grey = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255.0  # one grey level in normalised units
    for t, d in zip(torch_batches, dali_batches):
        torch.testing.assert_close(d["labels"], t["labels"])
        diff = ((d["image"] - t["image"]).abs() * grey).float()  # in grey levels
        if image_format == "png":
            assert diff.max() < 0.01, float(diff.max())
        else:
            assert diff.mean() < 1.0 and torch.quantile(diff.flatten(), 0.999) <= 8, float(diff.mean())


def test_mask_pass_on_gpu_matches_the_cpu_masks(tiny_shards, tmp_path):
    """The same classifier weights and patches: stage 2 on cuda:0 vs. on the CPU."""
    import yaml

    from mlps_dist.checkpoint import save_model_file
    from mlps_dist.data.shards import open_split
    from mlps_dist.models import create_classifier
    from mlps_dist.pseudo_masks import PseudoMaskStore

    classes = open_split(tiny_shards, "train").classes
    torch.manual_seed(0)
    weights = create_classifier("small38", len(classes)).state_dict()
    masks = {}
    for where in ("cpu", "gpu"):
        run = tmp_path / where
        save_model_file(run / "classifier" / "model.pt", weights,
                        {"name": "small38", "num_classes": len(classes), "classes": list(classes), "config": {}})
        (run / "config.yaml").write_text(yaml.safe_dump({"run_dir": str(run), "data": {
            "root": str(tiny_shards), "num_workers": 0}, "masks": {"chunk_size": 4, "batch_size": 4}}))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        if where == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        done = subprocess.run([sys.executable, "-m", "mlps_dist.generate_masks", "--config", str(run / "config.yaml")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        store = PseudoMaskStore(run / "pseudo_masks" / "train")
        masks[where] = np.stack([np.stack(store.read_masks(i)) for i in range(len(open_split(tiny_shards, "train")))])
    equal = float((masks["cpu"] == masks["gpu"]).mean())
    assert equal >= 0.995, equal  # Grad-CAM near-ties may flip a few pixels under other rounding


@pytest.mark.slow
def test_demo_pipeline_on_one_gpu(tmp_path):
    env = {**os.environ, "DEMO_DATA": str(tmp_path / "data"), "NPROC_PER_NODE": "1"}
    done = subprocess.run(["bash", "launch/demo.sh", str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    test = json.loads((tmp_path / "run" / "metrics" / "test.json").read_text())
    print(f"demo test mIoU (gated) {test['miou']:.4f}")
    assert test["miou"] >= DEMO_MIN_TEST_MIOU, test
