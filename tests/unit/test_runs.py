"""The run directory's owner and its guards: stamps and stale artefacts, resume refusal,
the run lock, the one runner's exit statuses and messages, shard index checks, the
newest complete checkpoint, outputs that would overwrite inputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlps_dist.cli import status as status_command
from mlps_dist.config import config_from_dict
from mlps_dist.core import layout, runner
from mlps_dist.core.errors import InputError, Preempted
from mlps_dist.core.lock import RunLock, RunLockedError
from mlps_dist.data import shards
from mlps_dist.data.shards import ShardError, open_split, read_info, write_info
from mlps_dist.run import artifacts
from mlps_dist.train.checkpoint import Checkpointer, CheckpointError, save_model_file

REPO = Path(__file__).resolve().parents[2]


def make_cfg(run: Path, data_root: Path, **sections):
    values = {
        "run_dir": str(run),
        "data": {"root": str(data_root), "num_workers": 0},
        "classifier": {"model": "small38", "epochs": 2},
        "segmenter": {"model": "deeplabv3plus_small"},
        "evaluate": {"splits": ["test"]},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return config_from_dict(values)


def finish_classifier(cfg, seed: int = 0) -> dict:
    """A finished stage 1 as the engine leaves it: model.pt, then the stamp."""
    torch.manual_seed(seed)
    save_model_file(layout.model_file(cfg.run_dir, "classifier"), {"w": torch.randn(3)}, {"name": "small38"})
    return artifacts.write_stamp(cfg, "classifier", artifacts.expected_inputs(cfg, "classifier"))


def finish_masks(cfg) -> dict:
    folder = layout.masks_dir(cfg.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"complete": True}))
    return artifacts.write_stamp(cfg, "masks", artifacts.expected_inputs(cfg, "masks"))


# ---------------------------------------------------------------- stamps


def test_finished_means_the_stamp_matches_not_that_files_exist(tmp_path, tiny_shards):
    cfg = make_cfg(tmp_path / "run", tiny_shards)
    assert artifacts.status(cfg, "classifier").state == "todo"
    assert artifacts.status(cfg, "masks").state == "waiting"
    finish_classifier(cfg)
    assert artifacts.status(cfg, "classifier").state == "done"
    # Operational keys change nothing ...
    same = make_cfg(
        tmp_path / "run",
        tiny_shards,
        data={"num_workers": 7, "loader": "dali", "max_downscale": 2.0},
        classifier={"log_every_steps": 3, "ckpt_every_steps": 5, "keep_last": 4},
    )
    assert artifacts.status(same, "classifier").state == "done"
    # ... a key that shapes the classifier makes it stale, and the refusal names it.
    changed = make_cfg(tmp_path / "run", tiny_shards, classifier={"lr": 0.5})
    st = artifacts.status(changed, "classifier")
    assert (
        st.state == "stale"
        and "classifier.lr (0.01 -> 0.5)" in st.message
        and "--restart-from classifier" in st.message
    )
    with pytest.raises(artifacts.StaleError, match=r"classifier.lr"):
        artifacts.require_runnable(changed, "classifier")
    # A key added by a later release: a stamp without it was made with the value that behaves
    # as before (sgd), so the stage stays finished; another value is a change.
    stamp_path = layout.stamp_file(cfg.run_dir, "classifier")
    stamp = json.loads(stamp_path.read_text())
    del stamp["inputs"]["config"]["classifier.optimizer"], stamp["inputs"]["config"]["classifier.ema_decay"]
    stamp_path.write_text(json.dumps(stamp))
    assert artifacts.status(cfg, "classifier").state == "done"
    adamw = artifacts.status(make_cfg(tmp_path / "run", tiny_shards, classifier={"optimizer": "adamw"}), "classifier")
    assert adamw.state == "stale" and "classifier.optimizer ('sgd' -> 'adamw')" in adamw.message
    averaged = artifacts.status(make_cfg(tmp_path / "run", tiny_shards, classifier={"ema_decay": 0.99}), "classifier")
    assert averaged.state == "stale" and "classifier.ema_decay (0.0 -> 0.99)" in averaged.message
    # Replacing the weights behind the stamp's back is noticed too.
    torch.save({"state_dict": {}, "meta": {}}, layout.model_file(cfg.run_dir, "classifier"))
    assert artifacts.status(cfg, "classifier").state == "stale"


def test_a_key_missing_from_an_old_stamp_counts_as_its_default(tmp_path, tiny_shards):
    """A stamp made before a config key existed lacks it: it was made with the behaviour the
    key's default has now, so the stage stays done, and a non-default value is named."""
    cfg = make_cfg(tmp_path / "run", tiny_shards)
    finish_classifier(cfg)
    path = layout.stamp_file(cfg.run_dir, "classifier")
    record = json.loads(path.read_text())
    del record["inputs"]["config"]["classifier.ema_decay"]
    path.write_text(json.dumps(record))
    assert artifacts.status(cfg, "classifier").state == "done"
    changed = make_cfg(tmp_path / "run", tiny_shards, classifier={"model": "small38", "epochs": 2, "ema_decay": 0.5})
    st = artifacts.status(changed, "classifier")
    assert st.state == "stale" and "classifier.ema_decay (0.0 -> 0.5)" in st.message


def test_a_changed_upstream_artefact_makes_everything_downstream_stale(tmp_path, tiny_shards):
    cfg = make_cfg(tmp_path / "run", tiny_shards)
    finish_classifier(cfg, seed=0)
    finish_masks(cfg)
    assert artifacts.status(cfg, "masks").state == "done"
    assert artifacts.status(cfg, "segmenter").state == "todo"
    finish_classifier(cfg, seed=1)  # retrained: other weights, a new stamp
    st = artifacts.status(cfg, "masks")
    assert st.state == "stale" and "the classifier artefact" in st.message
    with pytest.raises(artifacts.StaleError, match="segmenter needs the masks stage, but masks"):
        artifacts.require_runnable(cfg, "segmenter")


def test_changed_shards_make_the_stage_stale(tmp_path, tiny_shards):
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    cfg = make_cfg(tmp_path / "run", data)
    finish_classifier(cfg)
    info = read_info(data)
    info["classes"] = list(reversed(info["classes"]))  # same count, other names
    write_info(data, info)
    st = artifacts.status(cfg, "classifier")
    assert st.state == "stale" and "the shards in data.root" in st.message


def test_changed_evaluation_settings_evaluate_again_and_restart_moves_stages_aside(tmp_path, tiny_shards):
    cfg = make_cfg(tmp_path / "run", tiny_shards)
    finish_classifier(cfg)
    finish_masks(cfg)
    save_model_file(layout.model_file(cfg.run_dir, "segmenter"), {"w": torch.ones(2)}, {"name": "x"})
    artifacts.write_stamp(cfg, "segmenter", artifacts.expected_inputs(cfg, "segmenter"))
    metrics = layout.metrics_file(cfg.run_dir, "test")
    metrics.parent.mkdir()
    metrics.write_text("{}")
    artifacts.write_stamp(cfg, "evaluate", artifacts.expected_inputs(cfg, "evaluate", "test"), "test")
    assert artifacts.status(cfg, "evaluate").state == "done"
    other = make_cfg(tmp_path / "run", tiny_shards, evaluate={"gate_threshold": 0.3})
    assert artifacts.status(other, "evaluate").state == "todo"  # not refused: metrics are just recomputed
    refined = make_cfg(tmp_path / "run", tiny_shards, evaluate={"refine": {"enabled": True}})
    assert "evaluate.refine.enabled" in " ".join(artifacts.status(refined, "evaluate").changed)
    report = layout.masks_report_file(cfg.run_dir)  # stage 2's quality report of the masks
    report.write_text('{"val": {}}')
    moved = artifacts.restart(cfg, "segmenter")  # the masks stay, and their report with them
    assert sorted(p.name for p in moved.iterdir()) == ["metrics", "segmenter"]
    assert report.read_text() == '{"val": {}}' and not layout.masks_report_file(moved).exists()
    assert layout.metrics_file(moved, "test").is_file() and not metrics.exists()
    assert artifacts.status(cfg, "masks").state == "done" and artifacts.status(cfg, "segmenter").state == "todo"
    moved = artifacts.restart(cfg, "masks")
    assert sorted(p.name for p in moved.iterdir()) == ["metrics", "pseudo_masks"]
    assert layout.masks_report_file(moved).is_file() and not report.exists()
    assert artifacts.status(cfg, "classifier").state == "done" and artifacts.status(cfg, "masks").state == "todo"


def test_status_command_exit_statuses(tmp_path, tiny_shards, capsys):
    cfg = make_cfg(tmp_path / "run", tiny_shards)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({**cfg.to_dict(), "run_dir": "elsewhere"}))
    args = [str(config), str(cfg.run_dir), "--stage", "classifier"]
    assert status_command.main(args) == 1
    assert capsys.readouterr().out.split()[:2] == ["classifier", "ready"]
    finish_classifier(cfg)
    assert status_command.main(args) == 0
    assert capsys.readouterr().out.split()[:2] == ["classifier", "done"]
    assert status_command.main([*args, "classifier.epochs=3"]) == 2
    assert "classifier.epochs (2 -> 3)" in capsys.readouterr().out


def test_resume_with_a_changed_schedule_is_refused_naming_the_keys(tmp_path, tiny_shards):
    from mlps_dist.run.artifacts import check_same_inputs

    cfg = make_cfg(tmp_path / "run", tiny_shards)
    state = {"config": cfg.to_dict(), "inputs": artifacts.expected_inputs(cfg, "classifier")}
    check_same_inputs(cfg, "classifier", state, Path("ck"))  # the same run resumes
    longer = make_cfg(tmp_path / "run", tiny_shards, classifier={"epochs": 5, "batch_size": 32}, seed=3)
    with pytest.raises(artifacts.StaleError) as err:
        check_same_inputs(longer, "classifier", state, Path("ck"))
    for key in ("classifier.epochs (2 -> 5)", "classifier.batch_size (16 -> 32)", "seed (0 -> 3)"):
        assert key in str(err.value)
    # A key the checkpoint's record lacks (added to the config since) counts as its default:
    # the same run resumes when the config keeps that default, and is refused when it does not.
    defaults = artifacts.config_defaults()
    recorded = state["inputs"]["config"]
    at_default = next(k for k, v in recorded.items() if defaults[f"config.{k}"] == v)
    older = json.loads(json.dumps(state))
    del older["inputs"]["config"][at_default], older["inputs"]["config"]["classifier.epochs"]
    assert defaults["config.classifier.epochs"] != 2
    with pytest.raises(artifacts.StaleError, match=r"changed: classifier.epochs \(\d+ -> 2\)\. "):
        check_same_inputs(cfg, "classifier", older, Path("ck"))
    del state["inputs"]["config"][at_default]
    check_same_inputs(cfg, "classifier", state, Path("ck"))
    # A checkpoint that records no inputs cannot be checked: refused, naming it.
    with pytest.raises(artifacts.StaleError, match=r"checkpoint ck records no inputs"):
        check_same_inputs(cfg, "classifier", {"config": cfg.to_dict()}, Path("ck"))


def test_the_mask_manifest_diffs_as_the_stamps_do(tmp_path):
    """One diff for every provenance record: tuples equal the lists JSON holds, a missing key
    is its default where one is given, and the pseudo-mask manifest follows the same rule."""
    from mlps_dist.config import Config
    from mlps_dist.core.records import UNSET, changed, flatten
    from mlps_dist.data.pseudo_masks import PseudoMaskError, check_manifest, new_manifest
    from mlps_dist.stages.generate_masks import config_settings

    assert changed({"a": {"b": 1}, "c": (1, 2)}, {"a": {"b": 2}, "c": [1, 2]}) == {"a.b": (1, 2)}
    assert changed({}, {"x": 1}, {"x": 1}) == {} and changed({}, {"x": 2}, {"x": 1}) == {"x": (1, 2)}
    assert changed({"y": 1}, {}) == {"y": (1, UNSET)}
    settings = {"count": 3, **config_settings(Config())}
    older = json.loads(json.dumps(new_manifest("train", settings)))
    del older["settings"]["background"]["max_saturation"]  # a manifest from before the key
    defaults = flatten(config_settings(Config()))
    check_manifest(tmp_path, older, settings, defaults)  # it was made at the default: resumable
    limited = json.loads(json.dumps(settings))
    limited["background"]["max_saturation"] = 20
    with pytest.raises(PseudoMaskError, match=r"\(changed: background\.max_saturation\)"):
        check_manifest(tmp_path, older, limited, defaults)
    with pytest.raises(PseudoMaskError, match=r"\(changed: count\)"):
        check_manifest(tmp_path, older, {**settings, "count": 4}, defaults)


# ---------------------------------------------------------------- lock


def test_lock_refuses_a_second_job_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = RunLock(run, "classifier").acquire()
    with pytest.raises(RunLockedError, match=rf"host {socket.gethostname()}, pid {os.getpid()}.*classifier"):
        RunLock(run, "masks").acquire()
    first.release()
    assert not (run / ".lock").exists()
    # A holder that died without releasing (SIGKILL, node crash) on this host.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "what": "classifier"}))
    lock = RunLock(run, "classifier").acquire()
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    # A holder on another host: stale once its heartbeat is older than MLPS_LOCK_STALE_S.
    (run / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "what": "x", "slurm_job": "42"}))
    with pytest.raises(RunLockedError, match="host elsewhere, pid 1, SLURM job 42"):
        RunLock(run, "classifier").acquire()
    monkeypatch.setenv("MLPS_LOCK_STALE_S", "60")
    old = time.time() - 120
    os.utime(run / ".lock", (old, old))
    RunLock(run, "classifier").acquire().release()


def test_lock_held_by_a_live_process_refuses_with_its_pid(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mlps_dist.core.lock import RunLock; "
            f"RunLock({str(run)!r}, 'segmenter').acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}, running segmenter"):
            RunLock(run, "classifier").acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(run, "classifier").acquire().release()  # its holder is gone now


# ---------------------------------------------------------------- runner


def test_runner_maps_errors_to_exit_statuses(capsys):
    def bad(_):
        raise InputError("data/x.png: not an image")

    assert runner.run(bad) == 2 and capsys.readouterr().err == "error: data/x.png: not an image\n"

    def preempted(_):
        raise Preempted("preempted at epoch 1 step 3; rerun to resume")

    assert runner.run(preempted) == 75

    def defect(_):
        raise KeyError("boom")

    assert runner.run(defect) == 1 and "Traceback" in capsys.readouterr().err
    assert runner.run(lambda _: None) == 0


def test_an_error_on_another_rank_is_printed_with_its_rank():
    code = (
        "import sys; from mlps_dist import dist; from mlps_dist.core import runner; from mlps_dist.data.shards import ShardError\n"  # noqa: E501
        "def body(_): raise ShardError('shards/train-000001.idx: bad index')\n"
        "sys.exit(runner.run(body))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "RANK": "3", "WORLD_SIZE": "4"},
    )
    assert done.returncode == 2
    assert done.stderr == "error (rank 3): shards/train-000001.idx: bad index\n"


# ---------------------------------------------------------------- files


def test_an_index_that_does_not_fit_its_tar_is_rejected(tmp_path, tiny_shards):
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    tar = data / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2048])  # a newer, shorter tar beside the old index
    with pytest.raises(ShardError, match=r"train-000001.idx: member .* lies outside .*train-000001.tar"):
        open_split(data, "train")


def test_shard_names_must_stay_inside_the_folder(tmp_path, tiny_shards):
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    info = read_info(data)
    info["splits"]["val"]["shards"][0]["tar"] = "../../etc/passwd.tar"
    write_info(data, info)
    with pytest.raises(ShardError, match=r"not a plain '\*.tar' file name"):
        open_split(data, "val")


def test_the_index_is_committed_before_its_tar(tmp_path, monkeypatch, tiny_shards):
    source = open_split(tiny_shards, "val")
    writer = shards.ShardWriter(tmp_path, "val", 0)
    writer.write(source.key(0), source.read(0))

    def killed(*_):
        raise KeyboardInterrupt  # the process dies between the two commits

    monkeypatch.setattr(shards, "commit_file", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    # The index is there, the tar is not: the shard is not complete (tar = commit point).
    assert (tmp_path / "val-000000.idx").is_file() and not (tmp_path / "val-000000.tar").exists()
    assert (tmp_path / f"val-000000.tar.{os.getpid()}.tmp").is_file()  # the temporary name carries the pid


def test_newest_complete_checkpoint_is_used_without_the_marker(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000004", "step-00000006.tmp"):
        (folder / name).mkdir(parents=True)
        (folder / name / "state.pt").write_bytes(b"x")
    (folder / "step-00000008").mkdir()  # no state.pt: not a complete checkpoint
    assert Checkpointer(folder).latest() == folder / "step-00000004"
    (folder / "latest").write_text("step-00000002")
    assert Checkpointer(folder).latest() == folder / "step-00000002"


def test_deepspeed_files_are_loaded_only_when_their_digests_match(tmp_path):
    from mlps_dist.train.checkpoint import _check_ds_digests, _write_ds_digests

    (tmp_path / "ds" / "state").mkdir(parents=True)
    (tmp_path / "ds" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint written by this program"):
        _check_ds_digests(tmp_path)
    _write_ds_digests(tmp_path)
    _check_ds_digests(tmp_path)
    (tmp_path / "ds" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"something else")
    with pytest.raises(CheckpointError, match="changed after this program wrote them"):
        _check_ds_digests(tmp_path)


def test_outputs_inside_inputs_and_foreign_folders_are_refused(tmp_path, tiny_luad_folder, capsys):
    from mlps_dist.cli import infer

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not read before the check")
    for out in (images, images / "masks"):
        assert infer.main(["--run", str(tmp_path / "run"), "--input", str(images), "--out", str(out)]) == 2
        assert "lies inside the input --input" in capsys.readouterr().err
    assert infer.main(["--run", str(tmp_path / "run"), "--input", str(images / "a.png"), "--out", str(images)]) == 2
    assert (images / "a.png").read_bytes() == b"not read before the check"

    make_shards = [sys.executable, "-m", "mlps_dist", "shards", "--layout", "luad", "--src", str(tiny_luad_folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    inside = subprocess.run(
        [*make_shards, "--out", str(tiny_luad_folder / "shards")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert inside.returncode == 2 and "lies inside the input --src" in inside.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "val-000000.tar").write_bytes(b"someone else's file")
    refused = subprocess.run([*make_shards, "--out", str(foreign)], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (foreign / "val-000000.tar").read_bytes() == b"someone else's file"


def test_patches_of_mixed_sizes_are_evaluated_one_per_batch(tmp_path, tiny_luad_folder):
    from PIL import Image

    from mlps_dist.data.ingest import build_plan, write_plan
    from mlps_dist.data.layouts import LUAD
    from mlps_dist.data.loaders import create_eval_loader

    src = tmp_path / "LUAD-HistoSeg"
    shutil.copytree(tiny_luad_folder, src)
    first = sorted((src / "val" / "img").iterdir())[0]
    for path, resample in ((first, Image.BILINEAR), (src / "val" / "mask" / first.name, Image.NEAREST)):
        Image.open(path).resize((40, 40), resample).save(path)
    data = tmp_path / "shards"
    write_plan(build_plan(LUAD, src, shard_size=10), data, log=lambda *_: None)
    reader = open_split(data, "val")
    assert reader.split_info["image_size"] is None
    cfg = make_cfg(tmp_path / "run", data)
    sizes = [
        tuple(batch["mask"].shape)
        for batch in create_eval_loader(cfg, reader, batch_size=4, rank=0, world=1, device=torch.device("cpu"))
    ]
    assert len(sizes) == len(reader) and sorted({s[-1] for s in sizes}) == [40, 48]
