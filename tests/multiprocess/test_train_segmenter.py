"""Stage 3: loss, input checks, two-rank DDP and DeepSpeed training, resume after preemption."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlps_dist.config import ConfigError, config_from_dict, save_config
from mlps_dist.core import png
from mlps_dist.core.errors import EXIT_PREEMPTED, Preempted
from mlps_dist.data.pseudo_masks import new_manifest, refresh_manifest, write_chunk
from mlps_dist.data.shards import open_split
from mlps_dist.models import create_classifier
from mlps_dist.run.runlog import RunLog
from mlps_dist.stages import train_segmenter
from mlps_dist.stages.train_segmenter import segmentation_loss
from mlps_dist.train import engine
from mlps_dist.train.checkpoint import load_model_file, save_model_file

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["b4_5", "b5_2", "bn7"]


def write_pseudo_masks(run_dir: Path, shards: Path, chunk_size: int = 8, skip_chunks=(), classes=None) -> Path:
    """Pseudo masks as stage 2 stores them: blocks of the patch's labelled classes, a white
    (ignore) corner, and a different block layout per layer."""
    reader = open_split(shards, "train")
    c = reader.num_classes
    folder = run_dir / "pseudo_masks" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"classes": classes or reader.classes, "count": len(reader), "layers": LAYERS, "chunk_size": chunk_size}
    manifest = new_manifest("train", settings)
    for chunk in range(manifest["num_chunks"]):
        if chunk in skip_chunks:
            continue
        samples = []
        for i in range(chunk * chunk_size, min((chunk + 1) * chunk_size, len(reader))):
            present = np.flatnonzero(reader.labels(i))
            pngs = []
            for layer in range(len(LAYERS)):
                rows = np.arange(48)[:, None] // (8 + 4 * layer)
                mask = present[(rows + np.arange(48)[None] // 16) % len(present)].astype(np.uint8)
                mask[:6, :6] = c  # white background: ignored by the loss
                pngs.append(png.encode_indices(mask))
            samples.append((reader.key(i), pngs))
        write_chunk(folder, chunk, samples, LAYERS)
    refresh_manifest(folder, manifest, complete=not skip_chunks)
    return folder


def seg_config(run_dir: Path, shards: Path, classifier: dict | None = None, **segmenter_keys):
    values = {
        "run_dir": str(run_dir),
        "seed": 1,
        "data": {"root": str(shards), "num_workers": 0, "image_size": 32},
        "classifier": classifier or {},
        "segmenter": {
            "model": "deeplabv3plus_small",
            "epochs": 1,
            "batch_size": 8,
            "lr": 0.01,
            "ckpt_every_steps": 0,
            "log_every_steps": 1,
            "vis_images": 2,
            **segmenter_keys,
        },
        "evaluate": {"batch_size": 4},
    }
    return config_from_dict(values)


# ---------------------------------------------------------------- loss


def test_loss_is_the_weighted_sum_of_per_layer_ce_over_non_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    masks = torch.randint(0, 3, (2, 2, 4, 5), generator=g)
    masks[:, 0, 0, :] = 3  # ignore a row in layer 0
    masks[:, 1, :, :2] = 3  # ignore two columns in layer 1
    loss = segmentation_loss(logits, masks, [0.7, 0.3], ignore_index=3)

    logp = logits.log_softmax(1)
    expected = 0.0
    for layer, weight in enumerate([0.7, 0.3]):
        target = masks[:, layer]
        keep = target != 3
        picked = logp.gather(1, target.clamp(max=2)[:, None])[:, 0]
        expected += weight * float(-picked[keep].mean())
    assert float(loss) == pytest.approx(expected, rel=1e-6)

    # logits under pixels ignored in every layer do not matter
    changed = logits.clone()
    changed[:, :, 0, :2] += 100.0  # ignored in both layers
    assert float(segmentation_loss(changed, masks, [0.7, 0.3], 3)) == pytest.approx(float(loss), rel=1e-6)


def test_layer_with_only_ignored_pixels_contributes_zero_not_nan():
    logits = torch.randn(1, 2, 3, 3)
    masks = torch.stack([torch.full((1, 3, 3), 2), torch.zeros(1, 3, 3, dtype=torch.long)], dim=1)
    loss = segmentation_loss(logits, masks, [0.5, 0.5], ignore_index=2)
    assert float(loss) == pytest.approx(0.5 * float(F.cross_entropy(logits, masks[:, 1])), rel=1e-6)


def test_public_loss_form_matches_the_public_code(tmp_path, tiny_shards):
    """segmenter.loss_batch_average + loss_white_channel reproduce 3_train_stage2.py's loss
    (written out here from that script and tool/loss.py) for a global batch of 8."""
    write_pseudo_masks(tmp_path / "run", tiny_shards)
    public = train_segmenter.prepare(
        seg_config(tmp_path / "run", tiny_shards, loss_batch_average=True, loss_white_channel=True)
    )
    plain = train_segmenter.prepare(seg_config(tmp_path / "run", tiny_shards))
    torch.manual_seed(0)
    c, n, hw = 4, 8, (6, 7)
    logits = torch.randn(n, c, *hw) * 3
    masks = torch.randint(0, c + 1, (n, 3, *hw))  # store order b4_5, b5_2, bn7; value 4 = white
    masks[:, 0], masks[:, 1] = masks[:, 0].where(masks[:, 2] != c, c), masks[:, 1].where(masks[:, 2] != c, c)
    batch = {"image": torch.zeros(n, 3, *hw), "masks": masks}

    target, target_a, target_b = masks[:, 2], masks[:, 1], masks[:, 0]  # PM_bn7, PM_b5_2, PM_b4_5
    output = torch.cat([logits, 100 * torch.ones(n, 1, *hw) * (target == 4).unsqueeze(dim=1)], dim=1)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    expected = (
        0.6 * criterion(output, target) / n
        + 0.2 * criterion(output, target_a) / n
        + 0.2 * criterion(output, target_b) / n
    )
    assert float(public.loss(lambda x: logits, batch)) == pytest.approx(float(expected), rel=1e-5)
    ours = float(plain.loss(lambda x: logits, batch))
    assert ours == pytest.approx(float(segmentation_loss(logits, masks[:, [2, 1, 0]], [0.6, 0.2, 0.2], c)))
    assert abs(ours / n - float(expected)) > 1e-4  # the two forms differ when there are white pixels


def test_mosaics_change_the_batch_the_loss_sees(tmp_path, tiny_shards):
    """segmenter.mosaic_prob reaches the loss: single-tissue patches get another tissue pasted in."""
    run = tmp_path / "run"
    write_pseudo_masks(run, tiny_shards)
    seen = {}
    for prob in (0.0, 1.0):
        task = train_segmenter.prepare(seg_config(run, tiny_shards, mosaic_prob=prob))
        masks = torch.arange(4).view(4, 1, 1, 1).expand(4, 3, 8, 8).to(torch.uint8)
        captured = []

        def model(x):
            captured.append(x.clone())  # noqa: B023
            return torch.zeros(x.shape[0], 4, 8, 8, requires_grad=True)

        torch.manual_seed(0)
        images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8)  # four single-tissue patches
        task.loss(model, {"image": images, "masks": masks})
        seen[prob] = captured[0]
    assert torch.equal(seen[0.0], torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8))
    assert all(len(seen[1.0][i].unique()) == 2 for i in range(4))


def test_layers_are_picked_from_the_store_order(tmp_path, tiny_shards):
    write_pseudo_masks(tmp_path / "run", tiny_shards)
    cfg = seg_config(tmp_path / "run", tiny_shards, loss_layers=["bn7", "b4_5"], loss_weights=[0.6, 0.4])
    task = train_segmenter.prepare(cfg)
    assert task.layer_slots == [2, 0]


# ---------------------------------------------------------------- input checks


def test_missing_pseudo_masks_are_refused_with_count_and_keys(tmp_path, tiny_shards, capsys):
    run = tmp_path / "run"
    write_pseudo_masks(run, tiny_shards, chunk_size=8, skip_chunks=(1,))
    with pytest.raises(ConfigError, match=r"no pseudo masks for 8 of 32 training samples \(first: train_00000008"):
        train_segmenter.prepare(seg_config(run, tiny_shards))
    cfg_file = tmp_path / "c.yaml"
    save_config(seg_config(run, tiny_shards), cfg_file)
    assert train_segmenter.main(["--config", str(cfg_file)]) == 2
    assert "mlps stage masks" in capsys.readouterr().err
    assert not (run / "segmenter" / "model.pt").exists()


def test_no_pseudo_masks_at_all_is_refused(tmp_path, tiny_shards):
    with pytest.raises(Exception, match="mlps stage masks"):
        train_segmenter.prepare(seg_config(tmp_path / "run", tiny_shards))


def test_mismatched_class_counts_are_refused(tmp_path, tiny_shards):
    run = tmp_path / "run"
    write_pseudo_masks(run, tiny_shards)
    with pytest.raises(ConfigError, match="'segmenter.num_classes' = 3"):
        train_segmenter.prepare(seg_config(run, tiny_shards, num_classes=3))

    classes = open_split(tiny_shards, "train").classes
    save_model_file(
        run / "classifier" / "model.pt",
        create_classifier("small38", 3).state_dict(),
        {"name": "small38", "num_classes": 3, "classes": classes[:3], "config": {}},
    )
    with pytest.raises(ConfigError, match=r"classifier/model.pt was made for 3 classes"):
        train_segmenter.prepare(seg_config(run, tiny_shards))
    (run / "classifier" / "model.pt").unlink()

    other = tmp_path / "other"
    write_pseudo_masks(other, tiny_shards, classes=["A", "B", "C", "D", "E"])
    with pytest.raises(ConfigError, match=r"manifest.json was made for 5 classes"):
        train_segmenter.prepare(seg_config(other, tiny_shards))


def test_the_small38_segmenter_starts_from_the_runs_classifier(tmp_path, tiny_shards):
    """segmenter.pretrained: classifier loads the stage-1 model the masks came from
    (classifier.checkpoint: last = model.pt) into the encoder; ASPP and decoder start fresh."""
    run = tmp_path / "run"
    write_pseudo_masks(run, tiny_shards)
    reader = open_split(tiny_shards, "train")
    torch.manual_seed(7)
    classifier = create_classifier("small38", reader.num_classes)
    with torch.no_grad():  # trained-looking BN statistics: the buffers must come across as well
        classifier.backbone.bn7.running_mean.uniform_(-1, 1)
    meta = {"name": "small38", "num_classes": reader.num_classes, "classes": reader.classes, "config": {}}
    save_model_file(run / "classifier" / "model.pt", classifier.state_dict(), meta)
    cfg = seg_config(
        run,
        tiny_shards,
        {"model": "small38", "checkpoint": "last"},
        model="deeplabv3plus_small38",
        pretrained="classifier",
    )
    model = train_segmenter.prepare(cfg).build_model()
    started, trained = model.backbone.state_dict(), classifier.backbone.state_dict()
    assert started.keys() == trained.keys()
    assert all(torch.equal(started[k], trained[k]) for k in trained)
    fresh = train_segmenter.prepare(seg_config(run, tiny_shards, model="deeplabv3plus_small38")).build_model()
    assert not torch.equal(fresh.backbone.bn7.running_mean, trained["bn7.running_mean"])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, reader.num_classes, 32, 32)


@pytest.mark.parametrize(
    "classifier,segmenter,key",
    [
        ({"model": "small38"}, {"model": "deeplabv3plus_small", "pretrained": "classifier"}, "segmenter.pretrained"),
        ({"model": "resnet38d"}, {"model": "deeplabv3plus_small38", "pretrained": "classifier"}, "classifier.model"),
        ({"model": "small38", "pretrained": "classifier"}, {}, "classifier.pretrained"),
    ],
)
def test_pretrained_classifier_needs_the_matching_networks(tmp_path, tiny_shards, classifier, segmenter, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        seg_config(tmp_path / "run", tiny_shards, classifier, **segmenter)


# ---------------------------------------------------------------- training


WORKER = """
import sys, torch
from mlps_dist import dist
from mlps_dist.train import engine
from mlps_dist.stages import train_segmenter
from mlps_dist.config import load_config
from mlps_dist.run.runlog import RunLog
cfg = load_config(sys.argv[1])
dist.init("gloo", force_group=cfg.segmenter.parallel == "deepspeed")
log = RunLog(cfg.run_dir, "segmenter")
task = train_segmenter.prepare(cfg)
trained = {}
validate = task.validate
task.validate = lambda module, epoch: (trained.update(module=module), validate(module, epoch))[1]
engine.fit(cfg, cfg.segmenter, task, log)
flat = torch.cat([p.detach().flatten() for p in trained["module"].parameters()])
torch.save(flat, f"{cfg.run_dir}/params-rank{dist.get_rank()}.pt")
log.close()
dist.teardown()
"""


def run_two_ranks(tmp_path: Path, shards: Path, parallel: str) -> Path:
    run = tmp_path / parallel
    write_pseudo_masks(run, shards)
    cfg_file = tmp_path / f"{parallel}.yaml"
    save_config(
        seg_config(
            run, shards, parallel=parallel, mosaic_prob=1.0, deepspeed_config=str(REPO / "configs/deepspeed/zero1.json")
        ),
        cfg_file,
    )
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(cfg_file),
        ],
        cwd=REPO,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def assert_trained_in_step(run: Path):
    p0, p1 = torch.load(run / "params-rank0.pt"), torch.load(run / "params-rank1.pt")
    assert torch.equal(p0, p1)  # the ranks hold the same weights after training
    state, meta = load_model_file(run / "segmenter" / "model.pt")
    assert meta["num_classes"] == 4 and meta["name"] == "deeplabv3plus_small"
    assert torch.equal(
        torch.cat([v.flatten() for k, v in state.items() if "running" not in k and "num_batches" not in k]), p0
    )
    assert (run / "segmenter" / "best.pt").is_file()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "scalars" and "val/miou" in r]
    assert val and all(f"val/iou/{c}" in val[-1] for c in ("TE", "NEC", "LYM", "TAS"))
    losses = [r["train/loss"] for r in records if r["kind"] == "scalars" and "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))  # 32 samples / batch 8
    assert list((run / "tb" / "segmenter").glob("events.*"))


@pytest.mark.slow
def test_two_rank_ddp_training(tmp_path, tiny_shards):
    assert_trained_in_step(run_two_ranks(tmp_path, tiny_shards, "ddp"))


@pytest.mark.slow
def test_two_rank_deepspeed_zero1_training(tmp_path, tiny_shards):
    assert_trained_in_step(run_two_ranks(tmp_path, tiny_shards, "deepspeed"))


def train_in_process(cfg, preempt_at_step: int | None = None) -> int:
    """One launch of stage 3 in this process; SIGUSR1 to ourselves inside step
    ``preempt_at_step``, as a cluster scheduler would send it."""
    task = train_segmenter.prepare(cfg)
    if preempt_at_step is not None:
        calls, loss = [0], task.loss

        def loss_then_signal(model, batch):
            calls[0] += 1
            if calls[0] == preempt_at_step:
                os.kill(os.getpid(), signal.SIGUSR1)
            return loss(model, batch)

        task.loss = loss_then_signal
    log = RunLog(cfg.run_dir, "segmenter", tensorboard=False)
    try:
        engine.fit(cfg, cfg.segmenter, task, log)
        return 0
    except Preempted:
        return EXIT_PREEMPTED
    finally:
        log.close()


@pytest.mark.parametrize("mosaic_prob", [0.0, 1.0])
def test_preempted_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_shards, mosaic_prob):
    """With mosaics on too: their draws come from the RNG the checkpoint saves."""
    runs = {}
    for name in ("straight", "preempted"):
        write_pseudo_masks(tmp_path / name, tiny_shards)
        runs[name] = seg_config(tmp_path / name, tiny_shards, batch_size=8, epochs=1, mosaic_prob=mosaic_prob)
    assert train_in_process(runs["straight"]) == 0
    assert train_in_process(runs["preempted"], preempt_at_step=2) == EXIT_PREEMPTED
    assert not (tmp_path / "preempted" / "segmenter" / "model.pt").exists()
    assert train_in_process(runs["preempted"]) == 0  # the relaunch resumes at step 3 of 4
    straight, _ = load_model_file(tmp_path / "straight" / "segmenter" / "model.pt")
    resumed, _ = load_model_file(tmp_path / "preempted" / "segmenter" / "model.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    events = [json.loads(line)["kind"] for line in (tmp_path / "preempted" / "log.jsonl").read_text().splitlines()]
    assert "resume" in events
    if mosaic_prob:  # the mosaics took part: without them the same run ends elsewhere
        write_pseudo_masks(tmp_path / "plain", tiny_shards)
        assert train_in_process(seg_config(tmp_path / "plain", tiny_shards, batch_size=8, epochs=1)) == 0
        plain, _ = load_model_file(tmp_path / "plain" / "segmenter" / "model.pt")
        assert any(not torch.equal(plain[key], straight[key]) for key in straight)
