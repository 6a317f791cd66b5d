"""Every evaluator of mlps_dist.method.evaluation through run_eval, on this rank's share of
one fixed data set (7 samples, batches of 2; the ranks' shares differ in size).

    torchrun --standalone --nproc_per_node=W tests/support/dist_scripts/eval_ranks.py OUT
    python tests/support/dist_scripts/eval_ranks.py OUT        # one process: the whole data set

OUT/results-r<rank>.json: the results, as json.dumps writes them (NaN included), so the
text of rank 0's file equals the one-process file when the sums over ranks are exact.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from mlps_dist import dist
from mlps_dist.method.evaluation import (
    AgreementEvaluator,
    CamEvaluator,
    ConfusionEvaluator,
    ExampleCollector,
    MultiLabelEvaluator,
    SkippedCounter,
    run_eval,
)

SAMPLES, CLASSES, BATCH = 7, 4, 2
LAST = SAMPLES - 1  # on the last rank: its figures reach rank 0 only through the reduction


def data() -> dict:
    rng = np.random.default_rng(0)
    scores_a = rng.random((SAMPLES, CLASSES, 5, 6)).astype(np.float32)
    scores_b = scores_a + rng.normal(0, 0.01, scores_a.shape).astype(np.float32)
    scores_b[LAST, 0, 0, 0] += 0.9  # the largest difference
    return {
        "mask": torch.from_numpy(rng.integers(0, CLASSES + 1, (SAMPLES, 9, 11))),  # CLASSES = ignore
        "labels": torch.from_numpy((rng.random((SAMPLES, CLASSES)) > 0.5).astype(np.float32)),
        "bad": torch.tensor([i == LAST for i in range(SAMPLES)]),
        "classes": torch.from_numpy(rng.integers(0, CLASSES, (SAMPLES, 9, 11))),
        "cam": torch.from_numpy(rng.integers(0, CLASSES + 1, (SAMPLES, 9, 11))),  # CLASSES = white
        "probs": torch.from_numpy(rng.random((SAMPLES, CLASSES))),
        "a": (scores_a.argmax(1), scores_a),
        "b": (scores_b.argmax(1), scores_b),
    }


def main(out: Path) -> None:
    dist.init("gloo")
    try:
        d = data()
        share = list(dist.partition(SAMPLES, dist.get_world_size(), dist.get_rank()))
        batches = [
            {
                "index": share[i : i + BATCH],
                "mask": d["mask"][share[i : i + BATCH]],
                "labels": d["labels"][share[i : i + BATCH]],
                "bad": d["bad"][share[i : i + BATCH]],
            }
            for i in range(0, len(share), BATCH)
        ]

        def predict(batch: dict) -> dict:
            i = batch["index"]
            return {
                "classes": d["classes"][i],
                "probs": d["probs"][i],
                "masks": {"cam": d["cam"][i]},
                "a": (d["a"][0][i], d["a"][1][i]),
                "b": (d["b"][0][i], d["b"][1][i]),
            }

        evaluators = {
            "confusion": ConfusionEvaluator(CLASSES, ignore_index=CLASSES),
            "labels": MultiLabelEvaluator(CLASSES),
            "cam": CamEvaluator(CLASSES, ignore_index=CLASSES, layers=["cam"]),
            "skipped": SkippedCounter(),
            "agreement": AgreementEvaluator("a", "b"),
            "examples": ExampleCollector(3, lambda batch, outputs, count: batch["index"][:count]),
        }
        results = run_eval(batches, predict, evaluators)
        (out / f"results-r{dist.get_rank()}.json").write_text(json.dumps(results, sort_keys=True))
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
