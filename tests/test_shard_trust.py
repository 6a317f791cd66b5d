"""What a shard folder says is checked before it is used: keys from an idx never become
paths, and a corrupt sample is named by shard and key."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_tool  # noqa: E402


def test_inspect_shards_never_writes_where_an_idx_key_points(tiny_shards, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_shards, evil)
    idx = evil / "val-000000.idx"
    lines = idx.read_text().splitlines()
    outside = tmp_path / "OUTSIDE"
    lines[1] = lines[1].replace("val_00000000", str(outside))
    idx.write_text("\n".join(lines) + "\n")
    result = run_tool("tools/inspect_shards.py", str(evil), "--dump", "2", "--split", "val", "--to",
                      str(tmp_path / "peek"))
    assert result.returncode == 2, result.stderr
    assert "expected 'val_00000000'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("OUTSIDE*"))
    good = run_tool("tools/inspect_shards.py", str(tiny_shards), "--dump", "2", "--split", "val", "--to",
                    str(tmp_path / "peek"))
    assert good.returncode == 0, good.stderr
    assert sorted(p.name for p in (tmp_path / "peek").iterdir())[:2] == ["val_00000000.json", "val_00000000.mask.png"]
