"""Loaders under real torchrun process groups (gloo): exactly-once evaluation with 1-3 ranks
(also with fewer shards than ranks and more ranks than samples) and equal training steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tool_runs import REPO

from mlps_dist.data.ingest import build_plan, write_plan
from mlps_dist.data.layouts import LUAD
from mlps_dist.data.sampling import permutation
from mlps_dist.data.shards import open_split


@pytest.fixture(scope="module")
def two_sample_eval_shards(tiny_luad_folder, tmp_path_factory):
    """Train as usual, but only 2 val samples: with 3 ranks one rank has nothing."""
    plan = build_plan(LUAD, tiny_luad_folder, shard_size=16)
    plan.splits["val"] = plan.splits["val"][:2]
    out = tmp_path_factory.mktemp("two_val") / "shards"
    write_plan(plan, out, log=lambda *_: None)
    return out


def run_ranks(k, root, out, backends):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        f"--nproc_per_node={k}",
        "tests/support/dist_scripts/loader_ranks.py",
        str(root),
        str(out),
        ",".join(backends),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(k)]


def check_exactly_once(ranks, backend, root):
    for split in ("val", "test"):
        reader = open_split(root, split)
        keys = [key for r in ranks for key in r[backend][split]["keys"]]
        assert len(keys) == len(set(keys)) == len(reader), (split, keys)
        assert set(keys) == {reader.key(i) for i in range(len(reader))}


def check_train(ranks, backend, root):
    n, world = len(open_split(root, "train")), len(ranks)
    lens = [r[backend]["train"]["len"] for r in ranks]
    steps = [len(r[backend]["train"]["steps"]) for r in ranks]
    assert lens == steps == [n // (2 * world)] * world
    assert all(r[backend]["train"]["steps_all_ranks"] == sum(steps) for r in ranks)
    order = permutation(n, 0, 1)  # epoch 1 of seed 0
    for rank, r in enumerate(ranks):  # step s of rank r: its 2 samples of the s-th global batch of 2 x world
        expected = [[f"train_{i:08d}" for i in order[s * 2 * world + 2 * rank :][:2]] for s in range(n // (2 * world))]
        assert r[backend]["train"]["steps"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_eval_exactly_once_torch(k, tiny_shards, two_sample_eval_shards, tmp_path):
    for root in (tiny_shards, two_sample_eval_shards):
        out = tmp_path / root.parent.name
        out.mkdir()
        ranks = run_ranks(k, root, out, ["torch"])
        check_exactly_once(ranks, "torch", root)
        check_train(ranks, "torch", root)
        if k == 3 and root == two_sample_eval_shards:
            assert [r["torch"]["val"]["len"] for r in ranks] == [1, 1, 0]


@pytest.mark.slow
def test_two_ranks_both_backends(tiny_shards, tmp_path):
    ranks = run_ranks(2, tiny_shards, tmp_path, ["torch", "dali"])
    for backend in ("torch", "dali"):
        check_exactly_once(ranks, backend, tiny_shards)
        check_train(ranks, backend, tiny_shards)
    assert ranks[0]["torch"] == ranks[0]["dali"] and ranks[1]["torch"] == ranks[1]["dali"]
