"""What a shard folder says is checked before it is used: keys from an idx never become
paths, and a corrupt sample is named by shard and key."""

from __future__ import annotations

import json
import shutil

import pytest
from tool_runs import run_tool  # noqa: E402


def test_inspect_shards_never_writes_where_an_idx_key_points(tiny_shards, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_shards, evil)
    idx = evil / "val-000000.idx"
    lines = idx.read_text().splitlines()
    outside = tmp_path / "OUTSIDE"
    lines[1] = lines[1].replace("val_00000000", str(outside))
    idx.write_text("\n".join(lines) + "\n")
    result = run_tool(
        "-m", "mlps_dist", "inspect", str(evil), "--dump", "2", "--split", "val", "--out", str(tmp_path / "peek")
    )
    assert result.returncode == 2, result.stderr
    assert "expected 'val_00000000'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("OUTSIDE*"))
    good = run_tool(
        "-m", "mlps_dist", "inspect", str(tiny_shards), "--dump", "2", "--split", "val", "--out", str(tmp_path / "peek")
    )
    assert good.returncode == 0, good.stderr
    assert sorted(p.name for p in (tmp_path / "peek").iterdir())[:2] == ["val_00000000.json", "val_00000000.mask.png"]


def copy_with_a_corrupt_sample(source, shards, split: str):
    """A copy of ``source`` whose .idx points the first ``split`` sample's image member at
    its labels bytes: a sample that cannot be decoded, inside an intact tar."""
    shutil.copytree(source, shards)
    idx = shards / f"{split}-000000.idx"
    lines = idx.read_text().splitlines()
    q = lines[1].split(" ")
    at = {q[i]: i for i in range(0, len(q), 4)}
    q[at["png"] + 1 : at["png"] + 3] = q[at["labels"] + 1 : at["labels"] + 3]
    lines[1] = " ".join(q)
    idx.write_text("\n".join(lines) + "\n")
    return shards


def test_a_corrupt_sample_is_named_by_shard_and_key_in_one_line(tiny_shards, tmp_path, capfd):
    from trained_runs import make_run

    from mlps_dist.data.shards import open_split
    from mlps_dist.stages import evaluate

    shards = copy_with_a_corrupt_sample(tiny_shards, tmp_path / "sh", "test")
    run = make_run(tmp_path / "run", data_root=str(shards))
    status = evaluate.main(
        [
            "--config",
            str(run / "config.yaml"),
            f"run_dir={run}",
            "data.num_workers=1",
            "evaluate.splits=[test]",
            "evaluate.batch_size=4",
        ]
    )
    err = capfd.readouterr().err
    assert status == 2, err
    line = [x for x in err.splitlines() if x.startswith("error")]
    assert len(line) == 1 and "test-000000.tar: sample test_00000000 cannot be decoded" in line[0], err
    assert "Traceback" not in err
    # With --skip-bad (evaluate.skip_bad=true) the sample is named, left out of the metrics and counted.
    status = evaluate.main(
        [
            "--config",
            str(run / "config.yaml"),
            "--skip-bad",
            f"run_dir={run}",
            "data.num_workers=1",
            "evaluate.splits=[test]",
            "evaluate.batch_size=4",
        ]
    )
    err = capfd.readouterr().err
    assert status == 0, err
    assert "sample test_00000000 cannot be decoded" in err and "left out of the metrics" in err
    record = json.loads((run / "metrics" / "test.json").read_text())
    assert record["skipped_bad"] == 1 and record["samples"] == len(open_split(shards, "test"))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_training_names_a_corrupt_sample_in_one_line_and_does_not_skip_it(loader, tiny_shards, tmp_path, capfd):
    """Stage 1 with either loader (DALI decoding on the CPU here): the corrupt training sample
    stops the stage in one line naming its shard and key (exit 2); training offers no skip (a
    resume replays one fixed sample order), so the line names only the fix."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from mlps_dist.stages import train_classifier

    shards = copy_with_a_corrupt_sample(tiny_shards, tmp_path / "sh", "train")
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / "run"),
                "data": {"root": str(shards), "num_workers": 1, "loader": loader},
                "classifier": {
                    "model": "small38",
                    "epochs": 1,
                    "batch_size": 4,
                    "ckpt_every_steps": 0,
                    "cam_images": 0,
                },
            }
        )
    )
    assert train_classifier.main(["--config", str(config)]) == 2
    err = capfd.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error")]
    assert len(line) == 1 and "train-000000.tar: sample train_00000000 cannot be decoded" in line[0], err
    assert "training does not skip samples" in line[0] and "skip_bad" not in line[0]
    assert "Traceback" not in err
