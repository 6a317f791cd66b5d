"""The evaluation loop and its evaluators: what each counts, and that the sums over ranks
equal one process."""

import json
import math

import numpy as np
import pytest
import torch
import torchrun_helpers as jobs

from mlps_dist.method.evaluation import (
    AgreementEvaluator,
    CamEvaluator,
    ConfusionEvaluator,
    Evaluator,
    ExampleCollector,
    MultiLabelEvaluator,
    SkippedCounter,
    run_eval,
)
from mlps_dist.method.metrics import ConfusionMatrix, multilabel_scores


class Recorder(Evaluator):
    """Writes down every call the loop makes."""

    def __init__(self, calls: list):
        self.calls = calls

    def reset(self):
        self.calls.append("reset")

    def process(self, batch, outputs):
        self.calls.append(("process", batch, outputs))

    def evaluate(self):
        self.calls.append("evaluate")
        return len(self.calls)


def test_run_eval_resets_processes_each_batch_with_its_prediction_then_evaluates():
    calls = []
    results = run_eval([1, 2, 3], lambda batch: batch * 10, {"first": Recorder(calls), "second": Recorder([])})
    assert calls == ["reset", ("process", 1, 10), ("process", 2, 20), ("process", 3, 30), "evaluate"]
    assert list(results) == ["first", "second"] and results["first"] == 5 and results["second"] == 5


def test_run_eval_twice_with_the_same_evaluators_counts_each_run_alone():
    target = torch.tensor([[0, 1, 1, 2]])
    batches = [{"mask": target}]
    evaluators = {"cm": ConfusionEvaluator(3, ignore_index=255)}
    wrong = run_eval(batches, lambda b: {"classes": torch.tensor([[2, 2, 2, 2]])}, evaluators)["cm"]
    right = run_eval(batches, lambda b: {"classes": target.clone()}, evaluators)["cm"]
    assert wrong["acc"] == pytest.approx(0.25) and right["acc"] == 1.0 and right["miou"] == 1.0


def test_confusion_evaluator_in_batches_equals_one_matrix_over_everything():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 4, (6, 7, 5)))  # 3 = ignore
    pred = torch.from_numpy(rng.integers(0, 3, (6, 7, 5)))
    batches = [{"mask": target[i : i + 4]} for i in (0, 4)]
    got = run_eval(
        batches,
        lambda b: {"gated": pred[:4] if len(b["mask"]) == 4 else pred[4:]},
        {"cm": ConfusionEvaluator(3, ignore_index=3, key="gated")},
    )["cm"]
    whole = ConfusionMatrix(3, ignore_index=3)
    whole.update(pred, target)
    assert got == whole.compute()


def test_multilabel_evaluator_in_batches_equals_the_scores_of_all_patches():
    rng = np.random.default_rng(2)
    probs, labels = torch.from_numpy(rng.random((9, 4))), torch.from_numpy((rng.random((9, 4)) > 0.5) * 1.0)
    batches = [{"labels": labels[i : i + 4], "probs": probs[i : i + 4]} for i in range(0, 9, 4)]
    got = run_eval(batches, lambda b: {"p": b["probs"]}, {"ml": MultiLabelEvaluator(4, key="p")})["ml"]
    assert got == multilabel_scores(probs, labels)


def test_cam_evaluator_counts_white_pixels_as_misses_and_scores_the_tissue_classes_only():
    target = torch.tensor([[0, 0, 1, 1, 2]])  # 2 = ignore: not counted
    masks = {
        "bn7": torch.tensor([[0, 2, 1, 1, 2]]),  # one class-0 pixel left white
        "b5_2": torch.tensor([[0, 0, 1, 0, 1]]),
    }
    got = run_eval([{"mask": target}], lambda b: {"masks": masks}, {"q": CamEvaluator(2, 2, ["bn7", "b5_2"])})["q"]
    assert list(got) == ["bn7", "b5_2"]
    assert got["bn7"]["iou"] == [0.5, 1.0] and got["bn7"]["miou"] == 0.75  # not the 3-column mean (0.5)
    assert got["bn7"]["acc"] == 0.75 and list(got["bn7"]) == ["miou", "fwiou", "acc", "macc", "iou"]
    assert got["b5_2"]["iou"] == pytest.approx([2 / 3, 1 / 2])


def test_cam_evaluator_without_white_pixels_gives_the_plain_confusion_miou_bit_for_bit():
    rng = np.random.default_rng(3)
    for _ in range(20):
        target = torch.from_numpy(rng.integers(0, 5, (3, 8, 8)))  # 4 = ignore
        pred = torch.from_numpy(rng.integers(0, 4, (3, 8, 8)))
        evaluators = {"q": CamEvaluator(4, 4, ["cam"])}
        cam = run_eval([{"mask": target}], lambda b, pred=pred: {"masks": {"cam": pred}}, evaluators)
        plain = ConfusionMatrix(4, ignore_index=4)
        plain.update(pred, target)
        assert cam["q"]["cam"]["miou"] == plain.compute()["miou"]  # stage-1 validation's figure, unchanged


def test_cam_evaluator_refuses_ground_truth_c_when_the_ignore_index_is_another_value():
    evaluator = CamEvaluator(2, ignore_index=255, layers=["cam"])
    with pytest.raises(ValueError, match="value 2, which is neither a class 0..1 nor the ignore index 255"):
        run_eval(
            [{"mask": torch.tensor([[0, 2]])}], lambda b: {"masks": {"cam": torch.tensor([[0, 1]])}}, {"q": evaluator}
        )


def test_skipped_counter_sums_the_flags_of_batches_that_have_them():
    batches = [{"bad": torch.tensor([True, False, True])}, {}, {"bad": torch.tensor([True])}]
    assert run_eval(batches, lambda b: None, {"skipped": SkippedCounter()}) == {"skipped": 3}


def test_agreement_evaluator_counts_equal_pixels_and_the_largest_score_difference():
    scores = np.zeros((2, 3, 1, 2), dtype=np.float32)
    other = scores.copy()
    other[1, 2, 0, 1] = 0.25
    classes, moved = np.array([[[0, 1]], [[2, 2]]]), np.array([[[0, 1]], [[2, 0]]])
    got = run_eval(
        [None],
        lambda b: {"onnx": (classes, scores), "torch": (moved, other)},
        {"a": AgreementEvaluator("onnx", "torch")},
    )["a"]
    assert got == {"samples": 2, "pixels": 4, "class_agreement": 0.75, "max_score_diff": 0.25}
    other[0, 0, 0, 0] = np.nan  # a nan score is infinitely far from any score
    got = run_eval(
        [None],
        lambda b: {"onnx": (classes, scores), "torch": (moved, other)},
        {"a": AgreementEvaluator("onnx", "torch")},
    )["a"]
    assert got["max_score_diff"] == math.inf


def test_agreement_evaluator_without_pixels_says_so():
    got = run_eval([], lambda b: None, {"a": AgreementEvaluator("x", "y")})["a"]
    assert got["pixels"] == 0 and got["samples"] == 0 and math.isnan(got["class_agreement"])


def test_example_collector_keeps_the_first_examples_and_asks_only_for_what_fits():
    asked = []

    def make(batch, outputs, count):
        asked.append(count)
        return [f"{batch}:{i}" for i in range(3)]  # more than asked for: cut to the limit

    collector = ExampleCollector(4, make)
    assert run_eval(["a", "b", "c"], lambda b: None, {"e": collector})["e"] == ["a:0", "a:1", "a:2", "b:0"]
    assert asked == [4, 1]  # nothing asked once full
    assert run_eval(["d"], lambda b: None, {"e": collector})["e"] == ["d:0", "d:1", "d:2"]  # reset between runs


@pytest.mark.slow
def test_two_ranks_give_exactly_the_results_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    script = "tests/support/dist_scripts/eval_ranks.py"
    single = jobs.run([script, str(one)], nproc=0, timeout=120)
    assert single.returncode == 0, single.stdout[-3000:]
    ranks = jobs.run([script, str(two)], nproc=2, timeout=180)
    assert ranks.returncode == 0, ranks.stdout[-3000:]
    whole = (one / "results-r0.json").read_text()
    assert (two / "results-r0.json").read_text() == whole
    expected, rank1 = json.loads(whole), json.loads((two / "results-r1.json").read_text())
    assert rank1.pop("examples") == []  # the pictures are rank 0's; every other result is every rank's
    assert json.dumps(rank1, sort_keys=True) == json.dumps(
        {k: v for k, v in expected.items() if k != "examples"}, sort_keys=True
    )
    assert expected["skipped"] == 1 and expected["examples"] == [0, 1, 2]  # sample 6 (rank 1's) is the bad one
    assert expected["agreement"]["samples"] == 7 and expected["agreement"]["max_score_diff"] > 0.8
