"""The GPU speed options (``gpu.*``, all off by default): keys, their effect where it exists on
the CPU (channels_last weights and inputs), and that none of them shapes a stage's result."""

from __future__ import annotations

import torch

from mlps_dist.config import ClassifierConfig, Config, GpuConfig, load_config
from mlps_dist.data import batching
from mlps_dist.data.dali_loader import source_workers
from mlps_dist.models import create_classifier
from mlps_dist.run import artifacts
from mlps_dist.train import gpu_options, parallel


def test_the_speed_options_are_off_by_default_and_do_not_shape_a_stage():
    assert GpuConfig() == GpuConfig(
        cudnn_benchmark=False, channels_last=False, dali_pinned_copies=False, dali_pipeline_per_run=False
    )
    cfg = load_config(
        "configs/demo.yaml",
        [
            "gpu.cudnn_benchmark=true",
            "gpu.channels_last=true",
            "gpu.dali_pinned_copies=true",
            "gpu.dali_pipeline_per_run=true",
        ],
    )
    assert cfg.gpu.cudnn_benchmark and cfg.gpu.channels_last and cfg.gpu.dali_pinned_copies
    assert cfg.gpu.dali_pipeline_per_run
    for stage in artifacts.STAGES:
        assert not any(k.startswith("gpu.") for k in artifacts.shaping_config(cfg.to_dict(), stage))


def test_apply_switches_cudnn_autotuning_on_cuda_ranks_only():
    before = torch.backends.cudnn.benchmark
    on = gpu_options.apply(GpuConfig(cudnn_benchmark=True, dali_pinned_copies=True), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark == before and "cudnn_benchmark" not in on
    assert on["dali_pinned_copies"] is False  # pinned copies only where there is a GPU to copy to
    on = gpu_options.apply(GpuConfig(dali_pipeline_per_run=True), torch.device("cpu"))
    assert on["dali_pipeline_per_run"] is True  # the DALI loader keeps its pipelines on a CPU rank too


def test_channels_last_trains_the_same_network_in_nhwc():
    section = ClassifierConfig(model="small38", batch_size=4, lr=0.01)
    plan = batching.plan_batches(section, 1)
    torch.manual_seed(0)
    reference = create_classifier("small38", 3, dropout=0.0)
    nhwc = create_classifier("small38", 3, dropout=0.0)
    nhwc.load_state_dict(reference.state_dict())
    for module in [*reference.modules(), *nhwc.modules()]:
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0  # its draws follow the memory layout
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    models = [
        parallel.wrap(m, section, plan=plan, total_steps=3, device=torch.device("cpu"), channels_last=cl)
        for m, cl in ((reference, False), (nhwc, True))
    ]
    conv = models[1].module.backbone.conv1a.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen = []
    models[1].module.backbone.conv1a.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32, generator=gen), (torch.rand(4, 3, generator=gen) < 0.5).float()
    for model in models:
        model.train()
        loss = torch.nn.functional.multilabel_soft_margin_loss(model(images), labels)
        model.backward(loss, boundary=True)
        model.step()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)
    # One step: the two layouts sum in different orders, and later steps through batch-of-4
    # BatchNorm and momentum amplify that rounding by an amount that depends on the threads
    # torch runs with (0.3 % of the update after one step on one thread, 4-8 % after 2-3).
    # Each tensor's change from the common start is compared, relative to its size.
    for (name, a), b in zip(models[0].module.state_dict().items(), models[1].module.state_dict().values()):
        start = initial[name]
        if not a.is_floating_point() or torch.equal(a, start):
            torch.testing.assert_close(b, a, msg=name)
            continue
        moved = (a - start).norm()
        assert (b - a).norm() <= 2e-2 * moved, (name, float((b - a).norm() / moved))


def test_dali_eval_loaders_read_in_the_thread_by_default():
    cfg, gpu = Config(), torch.device("cuda", 0)
    assert source_workers(cfg, gpu) == 2 and source_workers(cfg, gpu, eval_mode=True) == 0
    cfg.data.dali_source_workers = 3
    assert source_workers(cfg, gpu, eval_mode=True) == 3
