"""Training precision on the CPU: one setting (``<stage>.precision``) for DDP's autocast and
DeepSpeed's JSON; bf16 autocast through the real stage task on both back ends (BatchNorm
included); fp32 losses and fp32 PDA attention under autocast; refusals in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchrun_helpers as jobs

from mlps_dist.config import ConfigError, TrainConfig
from mlps_dist.data import batching
from mlps_dist.models import classifier as classifier_model
from mlps_dist.stages.train_classifier import ClassifierTask
from mlps_dist.train import parallel, precision

CPU = torch.device("cpu")


def test_deepspeed_precision_sections_come_from_the_config(tmp_path):
    plan = batching.plan_batches(TrainConfig(batch_size=4), 1)
    cfg = TrainConfig(batch_size=4, deepspeed_config="configs/deepspeed/zero1.json", parallel="deepspeed")
    bf16 = parallel.deepspeed_config(cfg, plan, amp_dtype=torch.bfloat16)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert bf16["bf16"] == {"enabled": False} and bf16["fp16"] == {"enabled": False}  # half weights break BatchNorm
    fp32 = parallel.deepspeed_config(cfg, plan, amp_dtype=None)
    assert fp32["torch_autocast"] == {"enabled": False} and not fp32["bf16"]["enabled"]
    for key in ("torch_autocast", "bf16", "fp16"):
        clash = tmp_path / f"{key}.json"
        clash.write_text(json.dumps({key: {"enabled": True}}))
        with pytest.raises(ConfigError, match=f"remove \\['{key}'\\].*precision"):
            parallel.deepspeed_config(TrainConfig(deepspeed_config=str(clash)), plan, amp_dtype=None)


def test_combinations_that_cannot_run_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="'segmenter.precision' = fp16 with 'segmenter.parallel' = deepspeed") as exc:
        precision.check(TrainConfig(precision="fp16", parallel="deepspeed"), "segmenter", torch.device("cuda", 0))
    assert "\n" not in str(exc.value) and "segmenter.precision=bf16" in str(exc.value)
    with pytest.raises(ConfigError, match="'classifier.precision' = fp16 needs CUDA"):
        precision.check(TrainConfig(precision="fp16"), "classifier", CPU)
    for ok in ("fp32", "bf16"):
        precision.check(TrainConfig(precision=ok, parallel="deepspeed"), "classifier", CPU)
    precision.check(TrainConfig(precision="fp16"), "classifier", torch.device("cuda", 0))


def test_fp16_with_deepspeed_is_refused_before_the_model_is_built(tmp_path, tiny_shards, capsys):
    from mlps_dist.stages import train_classifier

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / "run"),
                "data": {"root": str(tiny_shards), "num_workers": 0},
                "classifier": {"model": "small38", "batch_size": 4},
            }
        )
    )
    assert (
        train_classifier.main(["--config", str(cfg), "classifier.precision=fp16", "classifier.parallel=deepspeed"]) == 2
    )
    err = capsys.readouterr().err
    assert "'classifier.precision' = fp16 with 'classifier.parallel' = deepspeed" in err, err
    assert not (tmp_path / "run" / "classifier" / "checkpoints").exists()


def test_the_stage_one_loss_is_fp32_from_bf16_logits():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    labels = (torch.rand(4, 3) < 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ClassifierTask.loss(None, lambda x: logits, {"image": torch.zeros(4, 3, 8, 8), "labels": labels})
    assert loss.dtype == torch.float32
    assert torch.equal(loss, F.multilabel_soft_margin_loss(logits.float(), labels))


@pytest.mark.parametrize("white_channel", [False, True])
def test_the_stage_three_loss_is_fp32_from_bf16_logits(white_channel):
    """SegmenterTask.loss under autocast: DeepLab's logits come out bf16, the per-pixel cross
    entropy of every layer (and the white-channel form) is fp32, equal to the fp32 loss of the
    same bf16 logits, and its gradient reaches the network."""
    from types import SimpleNamespace

    from mlps_dist.config import SegmenterConfig
    from mlps_dist.models import create_segmenter
    from mlps_dist.stages.train_segmenter import SegmenterTask, segmentation_loss

    torch.manual_seed(0)
    model = create_segmenter("deeplabv3plus_small", 4, "")
    section = SegmenterConfig(loss_white_channel=white_channel)
    task = SimpleNamespace(section=section, layer_slots=[0, 1, 2], ignore_index=4)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 5, (2, 3, 32, 32), dtype=torch.uint8)  # 4 = ignore / white
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SegmenterTask.loss(task, lambda x: seen.append(model(x)) or seen[-1], {"image": images, "masks": masks})
    assert seen[0].dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = segmentation_loss(seen[0].float(), masks.long(), section.loss_weights, 4, white_channel=white_channel)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_normalised_pda_attention_is_computed_in_fp32_under_autocast(monkeypatch):
    seen = []
    original = classifier_model.dropped_cam_attention

    def spy(features, head_weight, gamma):
        out = original(features, head_weight, gamma)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(classifier_model, "dropped_cam_attention", spy)
    features, weight = torch.rand(2, 8, 6, 6), torch.randn(3, 8, 1, 1)
    reference = classifier_model.progressive_dropout_attention(features, weight, 0.9, "normalised")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = classifier_model.progressive_dropout_attention(features, weight, 0.9, "normalised")
    assert seen == [torch.float32, torch.float32]
    torch.testing.assert_close(amp, reference)  # fp32 features: the same map with or without autocast


def _run(tmp_path, tiny_shards, name, **section) -> tuple[dict, list[dict]]:
    """The stage-1 task on one rank (small38, BatchNorm training) for one epoch."""
    values = {
        "model": "small38",
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.01,
        "ckpt_every_steps": 0,
        "log_every_steps": 4,
        "cam_images": 0,
        "dropout": 0.0,
        **section,
    }
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / name),
                "seed": 1,
                "data": {"root": str(tiny_shards), "num_workers": 0},
                "classifier": values,
            }
        )
    )
    result = jobs.run(
        ["tests/support/engine_worker.py", str(tmp_path / f"out-{name}"), "--task", "classifier", "--config", str(cfg)],
        nproc=1,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    events = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return jobs.load_weights(tmp_path / f"out-{name}" / "weights-rank0.pt"), events


@pytest.mark.slow
def test_bf16_autocast_runs_the_classifier_through_ddp_and_deepspeed_on_cpu(tmp_path, tiny_shards):
    """bf16 trains the real stage-1 task (BatchNorm with fp32 statistics) on both back ends:
    the same autocast, so the same weights up to reduction order; both differ from fp32
    (the autocast did run) by bf16 rounding only. What ran is recorded in log.jsonl."""
    fp32, _ = _run(tmp_path, tiny_shards, "fp32")
    ddp, ddp_events = _run(tmp_path, tiny_shards, "ddp", precision="bf16")
    ds, ds_events = _run(
        tmp_path,
        tiny_shards,
        "ds",
        precision="bf16",
        parallel="deepspeed",
        deepspeed_config="configs/deepspeed/zero1.json",
    )
    ran = {e["parallel"]: e for e in ddp_events + ds_events if e["kind"] == "precision"}
    assert ran["ddp"]["autocast"] == ran["deepspeed"]["autocast"] == "bfloat16", ran
    assert ran["deepspeed"]["ran"] == "bf16 autocast (deepspeed torch_autocast) on cpu"
    weights = [k for k in fp32 if fp32[k].is_floating_point() and "running" not in k]
    for key in weights:
        torch.testing.assert_close(ds[key], ddp[key], rtol=1e-3, atol=1e-4)  # measured: equal

    def norm(d):
        return sum(float(d[k].double().norm()) ** 2 for k in weights) ** 0.5

    off = norm({k: ddp[k] - fp32[k] for k in weights}) / norm(fp32)
    assert 0 < off < 0.05, off  # measured 1.6 % after 8 steps (biases start at 0, so a global norm)


@pytest.mark.slow
def test_deepspeed_bf16_forward_runs_in_bf16_and_the_loss_in_fp32(tmp_path):
    """The regression task's forward inside DeepSpeed's engine comes out bf16 (its autocast is
    on, not switched off), with fp32 weights kept."""
    cfg = tmp_path / "ds.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / "ds"),
                "seed": 3,
                "segmenter": {
                    "epochs": 1,
                    "batch_size": 8,
                    "lr": 0.05,
                    "ckpt_every_steps": 0,
                    "log_every_steps": 1,
                    "parallel": "deepspeed",
                    "deepspeed_config": "configs/deepspeed/zero1.json",
                    "precision": "bf16",
                },
            }
        )
    )
    result = jobs.run(
        ["tests/support/engine_worker.py", str(tmp_path / "out"), "--config", str(cfg), "--dropout", "0"],
        nproc=1,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    blob = torch.load(tmp_path / "out" / "weights-rank0.pt", weights_only=True)
    assert blob["forward_dtype"] == "torch.bfloat16"
    assert all(v.dtype == torch.float32 for v in blob["weights"].values())
