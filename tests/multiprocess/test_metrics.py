"""Confusion-matrix metrics against an independent numpy implementation; multi-label scores."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mlps_dist.method.metrics import ConfusionMatrix, MultiLabelMeter, multilabel_scores

REPO = Path(__file__).resolve().parents[2]


def numpy_scores(targets, preds, num_classes, ignore_index):
    """Reference: the published evaluation recipe written with numpy bincount."""
    hist = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(targets, preds):
        t, p = t.ravel(), p.ravel()
        keep = t != ignore_index
        hist += np.bincount(num_classes * t[keep] + p[keep], minlength=num_classes**2).reshape(num_classes, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        recall = np.diag(hist) / hist.sum(1)
    freq = hist.sum(1) / hist.sum()
    return {
        "miou": np.nanmean(iou),
        "fwiou": (freq[freq > 0] * iou[freq > 0]).sum(),
        "acc": np.diag(hist).sum() / hist.sum(),
        "macc": np.nanmean(recall),
        "iou": iou,
    }


def random_batches(seed, num_classes, ignore_index, n=3, shape=(2, 17, 23), absent=()):
    rng = np.random.default_rng(seed)
    targets, preds = [], []
    allowed = [c for c in range(num_classes) if c not in absent]
    for _ in range(n):
        t = rng.choice(allowed + [ignore_index], size=shape)
        p = rng.choice(allowed, size=shape)
        # make predictions mostly right so IoUs are not all tiny
        right = rng.random(shape) < 0.6
        p[right & (t != ignore_index)] = t[right & (t != ignore_index)]
        targets.append(t)
        preds.append(p)
    return targets, preds


def assert_scores_match(ours, ref):
    for key in ("miou", "fwiou", "acc", "macc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_allclose(np.array(ours["iou"]), ref["iou"], atol=1e-12, equal_nan=True)


def test_matches_numpy_reference_with_ignore_pixels():
    targets, preds = random_batches(0, num_classes=4, ignore_index=4)
    cm = ConfusionMatrix(4, ignore_index=4)
    for t, p in zip(targets, preds):
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    ref = numpy_scores(targets, preds, 4, 4)
    assert_scores_match(cm.compute(), ref)
    kept = sum(int((t != 4).sum()) for t in targets)
    assert int(cm.counts.sum()) == kept  # ignore pixels are not counted


def test_class_absent_from_prediction_and_truth_is_nan_and_left_out_of_miou():
    targets, preds = random_batches(1, num_classes=4, ignore_index=4, absent=(2,))
    cm = ConfusionMatrix(4, ignore_index=4)
    for t, p in zip(targets, preds):
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    scores = cm.compute()
    assert math.isnan(scores["iou"][2])
    finite = [v for i, v in enumerate(scores["iou"]) if i != 2]
    assert scores["miou"] == pytest.approx(sum(finite) / 3)
    assert_scores_match(scores, numpy_scores(targets, preds, 4, 4))


def test_class_only_predicted_has_iou_zero():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])  # class 2 never in ground truth, predicted once
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, target)
    s = cm.compute()
    assert s["iou"] == pytest.approx([0.5, 1.0, 0.0])
    assert s["miou"] == pytest.approx(0.5)
    assert s["macc"] == pytest.approx(0.75)  # recall of class 2 is undefined (nan), left out
    assert s["acc"] == pytest.approx(0.75)


def test_ignore_index_other_than_c_and_reset():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 255], [1, 0]]))
    assert cm.counts.tolist() == [[1, 1], [0, 1]]
    cm.reset()
    assert int(cm.counts.sum()) == 0
    assert math.isnan(cm.compute()["acc"])


def test_bad_values_and_shapes_are_refused():
    cm = ConfusionMatrix(3, ignore_index=3)
    with pytest.raises(ValueError, match="target holds value 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="prediction holds value 3"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_multilabel_scores_against_hand_counts():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4], [0.7, 0.7, 0.05], [0.3, 0.1, 0.2]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    s = multilabel_scores(probs, labels)
    # predictions: [1,0,1] [0,1,0] [1,1,0] [0,0,0] -> exact matches rows 0 and 3
    assert s["acc"] == pytest.approx(2 / 4)
    assert s["label_acc"] == pytest.approx(10 / 12)
    # per class (tp, fp, fn): c0 (2,0,0) c1 (1,1,0) c2 (1,0,1)
    assert s["f1_per_class"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert s["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert s["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert multilabel_scores(probs, labels, threshold=0.65)["acc"] == pytest.approx(1 / 4)


def test_multilabel_meter_accumulates_like_one_call():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(10, 4, generator=g)
    labels = (torch.rand(10, 4, generator=g) > 0.5).float()
    meter = MultiLabelMeter(4)
    meter.update(probs[:3], labels[:3])
    meter.update(probs[3:], labels[3:])
    assert meter.compute() == multilabel_scores(probs, labels)  # integer counts: exactly equal


WORKER = """
import json, sys, numpy as np, torch
from mlps_dist import dist
from mlps_dist.method.metrics import ConfusionMatrix, MultiLabelMeter
dist.init("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
rng = np.random.default_rng(0)
target = rng.integers(0, 5, size=(6, 9, 11)); pred = rng.integers(0, 4, size=(6, 9, 11))
probs = rng.random((6, 4)); labels = (rng.random((6, 4)) > 0.5).astype(np.float32)
part = dist.partition(6, world, rank)
cm = ConfusionMatrix(4, ignore_index=4)
cm.update(torch.from_numpy(pred[part.start:part.stop]), torch.from_numpy(target[part.start:part.stop]))
meter = MultiLabelMeter(4)
meter.update(torch.from_numpy(probs[part.start:part.stop]), torch.from_numpy(labels[part.start:part.stop]))
cm.all_reduce(); meter.all_reduce()
if rank == 0:
    json.dump({"counts": cm.counts.tolist(), "ml": meter.counts.tolist()}, open(sys.argv[1], "w"))
dist.teardown()
"""


@pytest.mark.slow
def test_all_reduce_over_two_ranks_equals_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "out.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(out)],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    got = json.loads(out.read_text())

    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(6, 9, 11))
    pred = rng.integers(0, 4, size=(6, 9, 11))
    probs = rng.random((6, 4))
    labels = (rng.random((6, 4)) > 0.5).astype(np.float32)
    whole = ConfusionMatrix(4, ignore_index=4)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target))
    meter = MultiLabelMeter(4)
    meter.update(torch.from_numpy(probs), torch.from_numpy(labels))
    assert got["counts"] == whole.counts.tolist()
    assert got["ml"] == meter.counts.tolist()
