"""Classification gate and stage-4 evaluation (single process and two ranks)."""

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trained_runs import make_run  # noqa: E402

from mlps_dist.config import Config, config_from_dict, save_config
from mlps_dist.data.shards import open_split
from mlps_dist.predict.gate import allowed_classes, apply_gate, load_classifier, load_segmenter
from mlps_dist.stages import evaluate

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- gate


def test_gate_sets_excluded_logits_to_minus_inf_even_when_all_logits_are_negative():
    # Class 0 has the highest logit but the classifier rules it out; multiplying
    # probabilities by 0 would still not help here, -inf must.
    logits = torch.tensor([-1.0, -5.0, -3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    allowed = allowed_classes(torch.tensor([[0.05, 0.9, 0.5]]), threshold=0.1)
    gated = apply_gate(logits, allowed)
    assert torch.isinf(gated[:, 0]).all() and (gated[:, 0] < 0).all()
    assert torch.equal(gated[:, 1:], logits[:, 1:])
    assert (gated.argmax(1) == 2).all()


def test_gate_threshold_is_exclusive():
    assert allowed_classes(torch.tensor([[0.1, 0.1000001, 0.0]]), 0.1).tolist() == [[False, True, False]]


def test_gate_with_every_class_ruled_out_keeps_the_ungated_prediction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=g)
    probs = torch.tensor(
        [
            [0.01, 0.02, 0.05, 0.1],  # sample 0: everything gated off
            [0.01, 0.02, 0.95, 0.1],
        ]
    )  # sample 1: only class 2 remains
    pred = apply_gate(logits, allowed_classes(probs, 0.1)).argmax(1)
    assert torch.equal(pred[0], logits[0].argmax(0))
    assert (pred[1] == 2).all()


def test_gate_per_pixel_allowed_mask():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0] = 1.0  # class 0 wins everywhere ungated
    allowed = torch.tensor([[[[True, False]], [[True, True]]]])  # class 0 not allowed at pixel 1
    assert apply_gate(logits, allowed).argmax(1).tolist() == [[[0, 1]]]


# ---------------------------------------------------------------- evaluation


def eval_config(run_dir: Path, shards: Path, **evaluate_keys) -> Config:
    cfg = config_from_dict(
        {
            "run_dir": str(run_dir),
            "data": {"root": str(shards), "num_workers": 0},
            "classifier": {"model": "small38"},
            "segmenter": {"model": "deeplabv3plus_small"},
            "evaluate": {"splits": ["val", "test"], "batch_size": 3, **evaluate_keys},
        }
    )
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def reference_samples(shards: Path, split: str):
    """(normalised image (1,3,H,W), mask (H,W)) decoded here, not by the project's loaders."""
    reader = open_split(shards, split)
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    for i in range(len(reader)):
        sample = reader.read(i)
        rgb = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), np.float64)
        x = torch.from_numpy(((rgb - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
        yield x, np.asarray(Image.open(io.BytesIO(sample["mask.png"]))).astype(np.int64)


@torch.no_grad()
def reference_probs(run_dir: Path, shards: Path, split: str) -> np.ndarray:
    classifier, _ = load_classifier(run_dir, 4)
    return np.stack([torch.sigmoid(classifier(x))[0].numpy() for x, _ in reference_samples(shards, split)])


def reference_confusion(run_dir: Path, shards: Path, split: str, threshold: float | None) -> np.ndarray:
    """Sample by sample, without the project's loaders, gate or metrics."""
    segmenter, _ = load_segmenter(run_dir, "best", 4)
    classifier, _ = load_classifier(run_dir, 4)
    hist = np.zeros((4, 4), np.int64)
    for x, mask in reference_samples(shards, split):
        with torch.no_grad():
            logits = segmenter(x)[0].numpy()
            probs = torch.sigmoid(classifier(x))[0].numpy()
        if threshold is not None and (probs > threshold).any():
            logits[probs <= threshold] = -np.inf
        pred = logits.argmax(0)
        keep = mask != 4  # ignore index of the LUAD layout
        hist += np.bincount(4 * mask[keep] + pred[keep], minlength=16).reshape(4, 4)
    return hist


def iou_from(hist: np.ndarray) -> list:
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    return [None if math.isnan(v) else v for v in iou]


def test_evaluate_matches_a_sample_by_sample_reference(tmp_path, tiny_shards):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards), seed=3)
    # Make the gate bite: the untrained classifier's probabilities sit near 0.5; their
    # median over the val patches rules some classes out on some patches.
    reader = open_split(tiny_shards, "val")
    threshold = float(np.median(reference_probs(run, tiny_shards, "val")))
    cfg = eval_config(run, tiny_shards, gate_threshold=threshold)
    assert not np.array_equal(
        reference_confusion(run, tiny_shards, "val", threshold), reference_confusion(run, tiny_shards, "val", None)
    )
    results = evaluate.run(cfg, evaluate.RunLog(run, "evaluate", tensorboard=False))

    for split in ("val", "test"):
        saved = json.loads((run / "metrics" / f"{split}.json").read_text())
        assert saved["samples"] == len(open_split(tiny_shards, split))
        assert set(saved) >= {"miou", "fwiou", "acc", "macc", "iou", "ungated"}
        assert list(saved["iou"]) == reader.classes
        if split == "test":
            continue  # same code path; one split checked against the reference is enough
        for variant, thr in ((saved, threshold), (saved["ungated"], None)):
            hist = reference_confusion(run, tiny_shards, split, thr)
            assert variant["acc"] == pytest.approx(np.diag(hist).sum() / hist.sum())
            assert list(variant["iou"].values()) == pytest.approx(iou_from(hist))
    assert results["val"]["miou"] == saved_val_miou(run)


def saved_val_miou(run):
    return json.loads((run / "metrics" / "val.json").read_text())["miou"]


def test_without_gate_the_result_is_the_ungated_one_and_rerun_is_a_no_op(tmp_path, tiny_shards):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards))
    (run / "classifier" / "model.pt").unlink()  # no gate -> no classifier needed
    cfg = eval_config(run, tiny_shards, gate=False)
    cfg.evaluate.splits = ["val"]
    evaluate.run(cfg, evaluate.RunLog(run, "evaluate", tensorboard=False))
    out = run / "metrics" / "val.json"
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in saved["ungated"]} == saved["ungated"]
    stamp = out.stat().st_mtime_ns
    evaluate.run(cfg, evaluate.RunLog(run, "evaluate", tensorboard=False))
    assert out.stat().st_mtime_ns == stamp  # finished: not evaluated again


def test_split_without_masks_and_wrong_class_count_are_refused(tmp_path, tiny_shards):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards))
    cfg = eval_config(run, tiny_shards)
    cfg.evaluate.splits = ["val", "train"]  # set after validation, as a hand-edited run would
    with pytest.raises(ValueError, match="'train' has no ground-truth masks"):
        evaluate.run(cfg, evaluate.RunLog(run, "evaluate", tensorboard=False))
    from mlps_dist.models import create_segmenter
    from mlps_dist.train.checkpoint import load_model_file, save_model_file

    _, meta = load_model_file(run / "segmenter" / "model.pt")
    save_model_file(
        run / "segmenter" / "model.pt",
        create_segmenter("deeplabv3plus_small", 3).state_dict(),
        {**meta, "num_classes": 3, "classes": ["a", "b", "c"]},
    )
    cfg.evaluate.splits = ["val"]
    with pytest.raises(ValueError, match="3 classes"):
        evaluate.run(cfg, evaluate.RunLog(run, "evaluate", tensorboard=False))


def test_unfinished_segmenter_is_refused_with_exit_status_2(tmp_path, tiny_shards, capsys):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards))
    eval_config(run, tiny_shards)
    (run / "segmenter" / "model.pt").rename(run / "segmenter" / "best.pt")  # training still running
    assert evaluate.main(["--config", str(run / "config.yaml")]) == 2
    assert "stage 3 is not finished" in capsys.readouterr().err
    assert not (run / "metrics").exists()


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result(tmp_path, tiny_shards):
    run = make_run(tmp_path / "run", data_root=str(tiny_shards), seed=5)
    eval_config(run, tiny_shards)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "mlps_dist.stages.evaluate",
            "--config",
            str(run / "config.yaml"),
            "evaluate.splits=[val]",
        ],
        check=True,
        cwd=REPO,
        env=env,
        timeout=180,
        capture_output=True,
    )
    two = json.loads((run / "metrics" / "val.json").read_text())
    hist = reference_confusion(run, tiny_shards, "val", 0.1)
    assert two["acc"] == pytest.approx(np.diag(hist).sum() / hist.sum())
    assert list(two["iou"].values()) == pytest.approx(iou_from(hist))
