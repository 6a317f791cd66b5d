"""Shared fixtures: a tiny LUAD-layout dataset and its shards (built once per pytest run).

CPU tests stay CPU tests on a GPU node: unless MLPS_TEST_GPU=1, CUDA is hidden from this
process and every job it starts (CUDA_VISIBLE_DEVICES="", set before torch is imported), so
the stages pick gloo and the CPU. With MLPS_TEST_GPU=1 (tools/gpu_check.sh) the tests marked
``gpu`` run and every other test is skipped with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

GPU_RUN = os.environ.get("MLPS_TEST_GPU") == "1"
if not GPU_RUN:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

TINY = {"train": 32, "val": 8, "test": 8, "size": 48, "seed": 0}


@pytest.fixture(scope="session")
def tiny_luad_folder(tmp_path_factory) -> Path:
    """A LUAD-HistoSeg-layout folder of synthetic patches: 32 train, 8 val, 8 test, 48 px."""
    from mlps_dist.synthetic.patches import write_luad_layout

    out = tmp_path_factory.mktemp("tiny_luad") / "LUAD-HistoSeg"
    write_luad_layout(
        out, train=TINY["train"], val=TINY["val"], test=TINY["test"], size=TINY["size"], seed=TINY["seed"]
    )
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_luad_folder, tmp_path_factory) -> Path:
    """``tiny_luad_folder`` converted by mlps shards (shards of 10 samples, so
    train has 4 shards with a short last one, val/test 1 each); the folder is data.root."""
    from mlps_dist.data.ingest import build_plan, write_plan
    from mlps_dist.data.layouts import LUAD

    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    plan = build_plan(LUAD, tiny_luad_folder, shard_size=10)
    assert not plan.bad, plan.bad
    write_plan(plan, out, log=lambda *_: None)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run with MLPS_TEST_GPU=1 where CUDA is present, the others without
    it (CUDA hidden); each is skipped with the reason otherwise."""
    import torch

    cpu_test = pytest.mark.skip(reason="a CPU test: runs with CUDA hidden, without MLPS_TEST_GPU=1 (tools/test.sh)")
    if not GPU_RUN:
        gpu_test = pytest.mark.skip(
            reason='needs CUDA: the CPU suite hides it (CUDA_VISIBLE_DEVICES=""); '
            "MLPS_TEST_GPU=1 or bash tools/gpu_check.sh on a GPU node runs it"
        )
    elif not torch.cuda.is_available():
        gpu_test = pytest.mark.skip(
            reason=f"needs CUDA: torch {torch.__version__} sees no GPU here "
            f"(CUDA build: {torch.version.cuda or 'none'})"
        )
    else:
        gpu_test = None
    for item in items:
        if "gpu" not in item.keywords and GPU_RUN:
            item.add_marker(cpu_test)
        elif "gpu" in item.keywords and gpu_test is not None:
            item.add_marker(gpu_test)
