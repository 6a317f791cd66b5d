"""The stage-2 mask pass: exactly once over ranks, crash-resumable, refuses mixed inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mlps_dist.config import ConfigError
from mlps_dist.core import png
from mlps_dist.data.pseudo_masks import PseudoMaskError, PseudoMaskStore
from mlps_dist.data.sample_errors import SampleError
from mlps_dist.data.shards import open_split, read_index
from mlps_dist.models import create_classifier
from mlps_dist.run.artifacts import StaleError
from mlps_dist.stages import generate_masks
from mlps_dist.train.checkpoint import save_model_file

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["b4_5", "b5_2", "bn7"]
# Every run compares chunks that hold the same batches (2 samples), so masks must be bit-equal.
BASE = {"data": {"num_workers": 0}, "masks": {"chunk_size": 2, "batch_size": 2, "tta_flip": True}}


def make_run(tmp: Path, shards: Path, name: str, classes=None, seed: int = 0, **masks) -> Path:
    """A run dir holding a small38 classifier file and a config.yaml for it."""
    run = tmp / name
    torch.manual_seed(seed)
    classes = classes or open_split(shards, "train").classes
    model = create_classifier("small38", len(classes))
    save_model_file(
        run / "classifier" / "model.pt",
        model.state_dict(),
        {"name": "small38", "num_classes": len(classes), "classes": list(classes), "config": {}},
    )
    cfg = {"run_dir": str(run), "data": {**BASE["data"], "root": str(shards)}, "masks": {**BASE["masks"], **masks}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def torchrun(nproc: int, run: Path, *overrides: str, wait: bool = True):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "mlps_dist.stages.generate_masks",
        "--config",
        str(run / "config.yaml"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts its workers in their own sessions,
    so a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def run_inprocess(run: Path, *overrides: str) -> None:
    torch.set_num_threads(1)  # the same arithmetic as the torchrun workers (OMP_NUM_THREADS=1)
    # The body of main(): errors propagate here instead of becoming exit statuses.
    assert generate_masks._main(["--config", str(run / "config.yaml"), *overrides]) == 0


def mask_folder(run: Path) -> Path:
    return run / "pseudo_masks" / "train"


def all_masks(run: Path) -> dict[str, np.ndarray]:
    """key -> (L, H, W) masks, read straight from the tars; fails on a key seen twice."""
    out: dict[str, np.ndarray] = {}
    for tar_path in sorted(mask_folder(run).glob("masks-*.tar")):
        per_key: dict[str, dict[str, np.ndarray]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, layer = member.name.split(".")[:2]
                per_key.setdefault(key, {})[layer] = png.decode(tar.extractfile(member).read())
        for key, layers in per_key.items():
            assert key not in out, f"{key} has masks in two chunks"
            assert sorted(layers) == sorted(LAYERS), f"{key}: layers {sorted(layers)}"
            out[key] = np.stack([layers[layer] for layer in LAYERS])
    return out


def tar_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(mask_folder(run).glob("masks-*.tar"))}


@pytest.fixture(scope="module")
def baseline(tiny_shards, tmp_path_factory) -> Path:
    """One uninterrupted single-rank pass: the output every other run must reproduce."""
    run = make_run(tmp_path_factory.mktemp("masks"), tiny_shards, "baseline")
    torchrun(1, run)
    return run


def test_baseline_pass_is_complete_and_reported(baseline, tiny_shards):
    reader = open_split(tiny_shards, "train")
    masks = all_masks(baseline)
    assert sorted(masks) == [reader.key(i) for i in range(len(reader))]
    manifest = json.loads((mask_folder(baseline) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["done"] == list(range(16)) and manifest["layers"] == LAYERS
    assert manifest["count"] == 32 and manifest["chunk_size"] == 2 and not manifest["skipped"]
    for key, mask in masks.items():
        labels = reader.labels(int(key.rsplit("_", 1)[1]))
        allowed = set(np.nonzero(labels)[0].tolist()) | {reader.ignore_index}
        assert set(np.unique(mask).tolist()) <= allowed, key
    # the keyed reader the segmenter loader uses
    store = PseudoMaskStore(mask_folder(baseline))
    assert store.layers == LAYERS and len(store) == 32 and store.missing(32) == []
    assert np.array_equal(store.read_masks(5), masks[reader.key(5)])
    assert [png.decode(p).shape for p in store.read_pngs(31)] == [(48, 48)] * 3
    # quality of the same masks on the val split, per layer
    report = json.loads((baseline / "metrics" / "pseudo_masks.json").read_text())
    assert sorted(report["val"]) == sorted(LAYERS)
    for scores in report["val"].values():
        assert 0.0 <= scores["miou"] <= 1.0 and sorted(scores["per_class"]) == sorted(reader.classes)
    assert list((baseline / "tb" / "masks").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_exactly_once_with_two_and_three_ranks(baseline, tiny_shards, tmp_path):
    two = make_run(tmp_path, tiny_shards, "two")
    torchrun(2, two)
    assert tar_bytes(two) == tar_bytes(baseline)
    # 3 ranks, 2 chunks: one rank has nothing to do and must still finish cleanly.
    three = make_run(tmp_path, tiny_shards, "three", chunk_size=16)
    torchrun(3, three)
    assert sorted(p.name for p in mask_folder(three).glob("masks-*.tar")) == ["masks-000000.tar", "masks-000001.tar"]
    got, expect = all_masks(three), all_masks(baseline)
    assert sorted(got) == sorted(expect)
    assert all(np.array_equal(got[k], expect[k]) for k in expect)


@pytest.mark.slow
def test_killed_pass_resumes_to_the_same_output(baseline, tiny_shards, tmp_path):
    run = make_run(tmp_path, tiny_shards, "killed")
    job = torchrun(2, run, wait=False)
    try:
        deadline = time.time() + 180
        while not list(mask_folder(run).glob("masks-*.tar")) and job.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        for pid in process_tree(job.pid):  # the launcher and both workers, mid-pass
            os.kill(pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    committed = list(mask_folder(run).glob("masks-*.tar"))
    assert 1 <= len(committed) < 16, f"{len(committed)} chunks when killed: the pass was not interrupted"
    assert not json.loads((mask_folder(run) / "manifest.json").read_text())["complete"]
    before = {p.name: p.stat().st_mtime_ns for p in committed}
    done = torchrun(1, run)  # resume with another world size
    assert tar_bytes(run) == tar_bytes(baseline)
    assert all(p.stat().st_mtime_ns == before[p.name] for p in committed), "committed chunks were redone"
    assert f"{16 - len(committed)} of 16 chunks" in done.stderr
    assert not list(mask_folder(run).glob("*.tmp"))
    # a finished pass: says so, changes nothing, exits 0
    stamps = {p.name: p.stat().st_mtime_ns for p in mask_folder(run).iterdir()}
    run_inprocess(run)
    assert {p.name: p.stat().st_mtime_ns for p in mask_folder(run).iterdir()} == stamps


def test_changed_inputs_are_refused(baseline, tiny_shards, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(baseline, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(baseline), str(run)))
    # The finished pass's stamp refuses first, naming the key ...
    with pytest.raises(StaleError, match=r"changed: masks.background.enabled \(True -> False\).*--restart-from"):
        run_inprocess(run, "masks.background.enabled=false")
    with pytest.raises(StaleError, match=r"changed: masks.chunk_size"):
        run_inprocess(run, "masks.chunk_size=4")
    torch.manual_seed(1)
    other = create_classifier("small38", 4)
    save_model_file(
        run / "classifier" / "model.pt",
        other.state_dict(),
        {"name": "small38", "num_classes": 4, "classes": open_split(tiny_shards, "train").classes, "config": {}},
    )
    with pytest.raises(StaleError, match=r"changed: the classifier artefact"):
        run_inprocess(run)
    # ... and without the stamp (an interrupted pass) the manifest still refuses to mix.
    (run / "pseudo_masks" / "stamp.json").unlink()
    with pytest.raises(PseudoMaskError, match=r"changed: classifier_sha256"):
        run_inprocess(run)


def test_classifier_for_other_classes_is_refused(tiny_shards, tmp_path):
    run = make_run(tmp_path, tiny_shards, "classes", classes=["TUM", "STR", "LYM", "NEC"])
    with pytest.raises(PseudoMaskError, match=r"trained on classes \['TUM'.*use the classifier trained on these"):
        run_inprocess(run)
    run = make_run(tmp_path, tiny_shards, "layers")
    with pytest.raises(ConfigError, match=r"'masks.layers' names \['b3'\]"):  # preflight, before any work
        run_inprocess(run, "masks.layers=[b4_5,b5_2,bn7,b3]")


def test_corrupt_sample_is_named_or_skipped(baseline, tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    reader = open_split(shards, "train")
    # Overwrite the PNG bytes of sample 13 in place (shard 1, position 3) with garbage.
    key, members = read_index(shards / "train-000001.idx")[3]
    offset, size = members["png"]
    with open(shards / "train-000001.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * size)
    assert key == reader.key(13)
    run = make_run(tmp_path, shards, "bad", chunk_size=16, tta_flip=False, tta_scales=[1.0])
    with pytest.raises(SampleError, match=rf"sample {key} cannot be decoded .*masks.skip_bad=true"):
        run_inprocess(run)
    run_inprocess(run, "masks.skip_bad=true", "masks.export_reference=true")
    manifest = json.loads((mask_folder(run) / "manifest.json").read_text())
    assert manifest["complete"] and list(manifest["skipped"]) == [key]
    masks = all_masks(run)
    assert len(masks) == 32 and (masks[key] == reader.ignore_index).all()
    assert not (masks[reader.key(12)] == reader.ignore_index).all()
    # the public code's layout, named after the source patches
    source = json.loads(reader.read(12)["json"])["source"]
    exported = run / "pseudo_masks" / "train_PM" / "PM_bn7" / Path(source).name
    assert np.array_equal(png.decode(exported.read_bytes()), masks[reader.key(12)][2])
    assert len(list((run / "pseudo_masks" / "train_PM" / "PM_b4_5").glob("*.png"))) == 32


def test_shards_without_labels_are_refused_before_work(tiny_shards, tmp_path):
    from mlps_dist.data.shards import ShardWriter, read_info, write_info

    source, shards = open_split(tiny_shards, "train"), tmp_path / "unlabelled"
    shards.mkdir()
    writer = ShardWriter(shards, "train", 0)
    for i in range(2):
        # "image" is the reader's alias of the encoded patch, not a stored member
        writer.write(source.key(i), {k: v for k, v in source.read(i).items() if k not in ("labels", "image")})
    info = read_info(tiny_shards)
    info["splits"] = {"train": {**info["splits"]["train"], "count": 2, "shards": [writer.close()]}}
    write_info(shards, info)
    run = make_run(tmp_path, shards, "unlabelled")
    with pytest.raises(PseudoMaskError, match=r"no 'labels' members.*patch-level labels"):
        run_inprocess(run)
    assert not (run / "pseudo_masks").exists()


def test_interrupted_pass_refuses_refined_or_saturation_limited_masks(baseline, tmp_path):
    """Without a stamp only the manifest guards the folder: masks made with the refinement or
    the saturation limit must not be mixed with plain ones; the manifest names the setting."""
    run = tmp_path / "copy"
    shutil.copytree(baseline, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(baseline), str(run)))
    (run / "pseudo_masks" / "stamp.json").unlink()
    settings = json.loads((run / "pseudo_masks" / "train" / "manifest.json").read_text())["settings"]
    assert "refine" not in settings and settings["background"]["max_saturation"] == 0
    with pytest.raises(PseudoMaskError, match=r"changed: .*refine"):
        run_inprocess(run, "masks.refine.enabled=true")
    with pytest.raises(PseudoMaskError, match=r"changed: background\.max_saturation"):
        run_inprocess(run, "masks.background.max_saturation=20")
