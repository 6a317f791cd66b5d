"""Shared fixtures: a tiny LUAD-layout dataset and its shards (built once per pytest run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": 32, "val": 8, "test": 8, "size": 48, "seed": 0}


@pytest.fixture(scope="session")
def tiny_luad_folder(tmp_path_factory) -> Path:
    """A LUAD-HistoSeg-layout folder of synthetic patches: 32 train, 8 val, 8 test, 48 px."""
    from mlps_dist.data.synthetic import write_luad_layout

    out = tmp_path_factory.mktemp("tiny_luad") / "LUAD-HistoSeg"
    write_luad_layout(out, train=TINY["train"], val=TINY["val"], test=TINY["test"], size=TINY["size"],
                      seed=TINY["seed"])
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_luad_folder, tmp_path_factory) -> Path:
    """``tiny_luad_folder`` converted by tools/make_shards.py (shards of 10 samples, so
    train has 4 shards with a short last one, val/test 1 each); the folder is data.root."""
    from mlps_dist.data.ingest import build_plan, write_plan
    from mlps_dist.data.layouts import LUAD

    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    plan = build_plan(LUAD, tiny_luad_folder, shard_size=10)
    assert not plan.bad, plan.bad
    write_plan(plan, out, log=lambda *_: None)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is present; elsewhere they are skipped with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    reason = (f"needs CUDA: torch {torch.__version__} sees no GPU here "
              f"(CUDA build: {torch.version.cuda or 'none'}); run bash tools/gpu_check.sh on a GPU node")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a script from tools/ in a fresh interpreter of this venv."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
