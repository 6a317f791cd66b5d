"""The stage session (mlps_dist/stages/session.py) with stand-in work: what it refuses, what
it maps to which exit status, when it stamps and when it does nothing at all."""

from __future__ import annotations

import json

from mlps_dist.core import layout
from mlps_dist.stages import session


def config_file(tmp_path, shards) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "data": {"root": str(shards)}}))
    return str(path)


def stage(prepare=lambda cfg: None, work=lambda cfg, log, prepared: None) -> session.Stage:
    return session.Stage("classifier", "a stand-in for stage 1", prepare=prepare, work=work)


def write_model(cfg, log, prepared) -> None:
    """What a training stage leaves behind: its final model file."""
    path = layout.model_file(cfg.run_dir, "classifier")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")


def test_a_value_error_while_preparing_is_an_input_error_and_one_in_the_work_a_defect(tmp_path, tiny_shards, capsys):
    def unreadable_input(cfg):
        raise ValueError("split 'val' of the shards has no masks")

    def defect(cfg, log, prepared):
        raise ValueError("a defect in the work")

    config = config_file(tmp_path, tiny_shards)
    assert session.main(stage(prepare=unreadable_input), [config]) == 2
    err = capsys.readouterr().err
    assert "error: split 'val' of the shards has no masks" in err and "Traceback" not in err
    assert session.main(stage(work=defect), [config]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not layout.stamp_file(tmp_path / "run", "classifier").exists()  # neither finished


def test_the_stamp_follows_the_work_and_a_finished_stage_does_nothing(tmp_path, tiny_shards, capsys):
    calls = []

    def work(cfg, log, prepared):
        calls.append(prepared)
        write_model(cfg, log, prepared)

    config, run = config_file(tmp_path, tiny_shards), tmp_path / "elsewhere"
    assert session.main(stage(prepare=lambda cfg: cfg.run_dir, work=work), [config, "--run", str(run)]) == 0
    assert calls == [str(run)]  # prepare's result is handed to the work
    assert json.loads(layout.stamp_file(run, "classifier").read_text())["stage"] == "classifier"
    capsys.readouterr()
    assert session.main(stage(work=work), [config, "--run", str(run)]) == 0
    assert len(calls) == 1  # finished for this config: no second pass over the work
    assert "classifier: finished for this config" in capsys.readouterr().out
    # A changed key that shapes the stage refuses it, naming the key (exit 2), still without work.
    assert session.main(stage(work=work), [config, "--run", str(run), "classifier.lr=0.5"]) == 2
    assert "classifier.lr" in capsys.readouterr().err and len(calls) == 1
