"""The run commands without training: mlps config (--get, --check, --reference), mlps status,
mlps stage/pipeline refusing bad input in one line, the stages' --run under torchrun's own
parser, and the launcher's signal forwarding and exit statuses on stand-in children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_configs import tiny_config

from mlps_dist.cli import config as config_cmd
from mlps_dist.cli import status as status_cmd
from mlps_dist.config import ConfigError, load_config, parse_cli

REPO = Path(__file__).resolve().parents[2]


def mlps(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlps_dist", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


# ---------------------------------------------------------------- mlps config


def test_the_config_reference_in_docs_is_current(capsys):
    assert config_cmd.main(["--reference"]) == 0
    printed = capsys.readouterr().out
    current = (REPO / "docs" / "config.md").read_text()
    assert printed == current, "docs/config.md is out of date: run  mlps config --reference > docs/config.md"
    # every key of the schema is in it, with its default and its comment
    assert "| `dist.shutdown_timeout_s` | int | `600` | Seconds torchrun waits" in printed
    assert "| `segmenter.augment.vflip` | bool | `false` |" in printed  # the subclass's default, not the base's
    assert '| `classifier.guard.watch` | list[str] | `["score", "f1"]` |' in printed
    assert "torch \\| dali" in printed  # a | inside a comment does not split the table row


def test_config_get_prints_one_resolved_value(capsys):
    assert config_cmd.main(["configs/demo.yaml", "--get", "dist.shutdown_timeout_s"]) == 0
    assert capsys.readouterr().out == "600\n"
    assert config_cmd.main(["configs/demo.yaml", "evaluate.splits=[val,test]", "--get", "evaluate.splits"]) == 0
    assert capsys.readouterr().out == '["val", "test"]\n'
    assert config_cmd.main(["configs/demo.yaml", "--run", "runs/elsewhere", "--get", "run_dir"]) == 0
    assert capsys.readouterr().out == "runs/elsewhere\n"
    assert config_cmd.main(["configs/demo.yaml", "--get", "evaluate.gates"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'evaluate.gates'" in err and "gate_threshold" in err


def test_config_prints_the_resolved_yaml_that_loads_back_to_itself(tmp_path, capsys):
    assert config_cmd.main(["configs/demo.yaml", "classifier.epochs=3", "seed=7"]) == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(capsys.readouterr().out)
    assert load_config(saved).to_dict() == load_config("configs/demo.yaml", ["classifier.epochs=3", "seed=7"]).to_dict()
    assert yaml.safe_load(saved.read_text())["classifier"]["epochs"] == 3


def test_config_check_checks_models_and_shards(tmp_path, tiny_shards, capsys):
    config = str(tiny_config(tmp_path / "tiny.yaml", tiny_shards))
    assert config_cmd.main([config, "--check"]) == 0
    assert "ok" in capsys.readouterr().out
    assert (
        config_cmd.main(
            [
                config,
                "masks.layers=[b4_5,b9_9]",
                "segmenter.loss_layers=[b4_5]",
                "segmenter.loss_weights=[1.0]",
                "--check",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'masks.layers'" in err and "b9_9" in err
    assert config_cmd.main([config, f"data.root={tmp_path / 'none'}", "--check"]) == 2
    assert "info.json" in capsys.readouterr().err
    assert config_cmd.main([config, "classifier.epochs=2"]) == 0  # without --check the shards are not asked


# ---------------------------------------------------------------- mlps status


def test_status_names_each_stage_and_what_is_left(tmp_path, tiny_shards, capsys):
    from mlps_dist.core import layout
    from mlps_dist.run import artifacts

    config, run = str(tiny_config(tmp_path / "tiny.yaml", tiny_shards)), str(tmp_path / "run")
    assert status_cmd.main([config, run]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["classifier", "ready"],
        ["masks", "waiting"],
        ["segmenter", "waiting"],
        ["evaluate", "waiting"],
    ]
    assert status_cmd.main(["--progress", "--stage", "classifier", config, run]) == 0
    assert capsys.readouterr().out == "none\n"

    (layout.checkpoints_dir(run, "classifier") / "step-00000004").mkdir(parents=True)
    assert status_cmd.main([config, run, "--stage", "classifier"]) == 1
    assert capsys.readouterr().out.split() == ["classifier", "resumes", "from", "checkpoint", "step-00000004"]
    assert status_cmd.main(["--progress", "--stage", "classifier", config, run]) == 0
    assert capsys.readouterr().out == "step-00000004\n"

    # A finished classifier (its stamp and model file): done for this config, stale for another.
    cfg = load_config(config, [f"run_dir={run}"])
    layout.model_file(run, "classifier").write_bytes(b"weights")
    artifacts.write_stamp(cfg, "classifier", artifacts.expected_inputs(cfg, "classifier"))
    assert status_cmd.main([config, run]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["classifier", "done"] and lines[1].split()[:2] == ["masks", "ready"]
    assert status_cmd.main([config, run, "classifier.lr=0.5"]) == 2
    stale = capsys.readouterr().out.splitlines()[0]
    assert stale.split()[:2] == ["classifier", "stale"] and "classifier.lr" in stale and "--restart-from" in stale


# ---------------------------------------------------------------- the stages' command line


def test_stages_take_config_then_run_and_overrides_in_any_order(tmp_path):
    cfg = parse_cli(["configs/demo.yaml", "--run", str(tmp_path / "r"), "seed=3"])
    assert (cfg.run_dir, cfg.seed) == (str(tmp_path / "r"), 3)
    same = parse_cli(["--", "seed=3", "--run", str(tmp_path / "r"), "--config", "configs/demo.yaml"])
    assert same.to_dict() == cfg.to_dict()
    # "--" is where torchrun's parser stops; a later one reaches the stage and is passed over
    assert parse_cli(["configs/demo.yaml", "--", "--run", str(tmp_path / "r"), "seed=3"]).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="two run directories"):
        parse_cli(["configs/demo.yaml", "run_dir=a", "--run", "b"])
    with pytest.raises(ConfigError, match="experiment YAML first"):
        parse_cli(["seed=3", "--run", "r"])


def test_torchrun_hands_the_stage_its_run_after_a_double_dash(tmp_path):
    """torchrun's own parser refuses a bare --run (its --run-path); the launcher's command line
    passes it, and the stage reads the run from what torchrun hands on."""
    from torch.distributed.run import get_args_parser

    from mlps_dist.cli.torchrun import STAGE_MODULES

    parser = get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--standalone", "-m", "mlps_dist", "classifier", "configs/demo.yaml", "--run", "r"])
    for stage, module in STAGE_MODULES.items():
        args = parser.parse_args(
            [
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                module,
                "--",
                "configs/demo.yaml",
                "--run",
                str(tmp_path / stage),
                "seed=4",
            ]
        )
        assert args.training_script == module
        cfg = parse_cli(args.training_script_args)
        assert (cfg.run_dir, cfg.seed) == (str(tmp_path / stage), 4)


def test_under_torchrun_the_stage_reads_its_run(tmp_path, tiny_shards):
    """torchrun -m mlps_dist -- STAGE CONFIG --run RUN, two real ranks: the evaluation finds no
    segmenter in RUN and rank 0 says so, naming that run (torchrun itself reports 1)."""
    config, run = str(tiny_config(tmp_path / "tiny.yaml", tiny_shards)), tmp_path / "elsewhere"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "mlps_dist",
            "--",
            "evaluate",
            config,
            "--run",
            str(run),
            "evaluate.batch_size=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    refusals = [line for line in done.stderr.splitlines() if line.startswith("error") and "not finished" in line]
    assert len(refusals) == 1 and f"segmenter in {run}" in refusals[0], done.stderr[-3000:]


def test_stage_and_pipeline_refuse_bad_input_in_one_line(tmp_path, tiny_shards):
    bad = mlps("stage", "clasifier", "configs/demo.yaml", str(tmp_path / "run"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown stage 'clasifier'" in bad.stderr
    assert "classifier, masks, segmenter, evaluate" in bad.stderr and "-m mlps_dist -- COMMAND" in bad.stderr
    config = str(tiny_config(tmp_path / "tiny.yaml", tiny_shards))
    nodes = mlps("stage", "classifier", config, str(tmp_path / "run"), NNODES="2", NODE_RANK="")
    assert nodes.returncode == 2 and "NODE_RANK" in nodes.stderr and nodes.stderr.count("\n") == 1
    no_test = mlps("pipeline", config, str(tmp_path / "run"), "evaluate.splits=[val]", "--check")
    assert no_test.returncode == 2 and "add test to evaluate.splits" in no_test.stderr
    ok = mlps("pipeline", "--check", config, str(tmp_path / "run"))
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    assert not (tmp_path / "run").exists()


def test_multi_node_torchrun_options(monkeypatch):
    from mlps_dist.cli.torchrun import torchrun_options

    env = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "RDZV_ID": "job7",
        "NPROC_PER_NODE": "4",
        "MAX_RESTARTS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    options, extra_env, shape = torchrun_options(90)
    assert shape == "2 node(s) x 4 process(es)"
    for wanted in (
        "--nproc-per-node=4",
        "--max-restarts=1",
        "--shutdown-timeout=90",
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=job7",
        "--rdzv-conf=is_host=false",
    ):
        assert wanted in options, (wanted, options)
    assert "--standalone" not in options and extra_env == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def test_worker_status_prefers_a_defect_then_a_preemption(tmp_path):
    from mlps_dist.cli.torchrun import worker_status

    assert worker_status(tmp_path) is None
    (tmp_path / "rank-3").write_text("2\n")
    assert worker_status(tmp_path) == 2
    (tmp_path / "rank-1").write_text("75\n")
    assert worker_status(tmp_path) == 75
    (tmp_path / "rank-2").write_text("1\n")
    assert worker_status(tmp_path) == 1


# ---------------------------------------------------------------- signals


# A launcher (the Forwarder) running a stand-in stage that records the signals it gets.
LAUNCHER = """
import sys
from mlps_dist.cli.forwarding import Forwarder
forwarder = Forwarder(forward=sys.argv[1] == "1").install()
print("ready", flush=True)
sys.exit(forwarder.run([sys.executable, "-c", sys.argv[2], sys.argv[3]]))
"""
CHILD = """
import signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
def stop(signum, frame):
    with log.open("a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if log.read_text().count("\\n") >= 1 and signum == signal.SIGTERM:
        time.sleep(0.5)
        sys.exit(75)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, stop)
log.with_suffix(".started").touch()
time.sleep(60)
sys.exit(0)
"""


def start_launcher(tmp_path: Path, forward: bool) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "child.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "1" if forward else "0", CHILD, str(log)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not log.with_suffix(".started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, log


def test_a_signal_reaches_the_child_once_as_sigterm_and_the_status_is_75(tmp_path):
    proc, log = start_launcher(tmp_path, forward=True)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the child checkpoints (SIGTERM) instead of dying
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGUSR1)  # a second notice is not passed on
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert log.read_text() == "SIGTERM\n"
    assert "received SIGINT: asking pid" in err and "received SIGUSR1 again: still waiting" in err


def test_without_forwarding_the_child_gets_nothing_and_its_failure_still_reads_as_preempted(tmp_path):
    proc, log = start_launcher(tmp_path, forward=False)
    os.kill(proc.pid, signal.SIGUSR1)  # under SLURM the step's processes get it from SLURM itself
    time.sleep(0.3)
    assert not log.exists() or log.read_text() == ""
    os.kill(proc.pid, signal.SIGUSR1)  # repeated: still nothing passed on
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == proc.pid]
    assert len(children) == 1
    os.kill(int(children[0].name), signal.SIGTERM)  # what SLURM would deliver to the stage
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and log.read_text() == "SIGTERM\n", err
    assert "the stage got it too" in err


def _parent(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return -1


def test_a_signal_before_any_stage_stops_with_75(tmp_path):
    script = (
        "import sys, time\nfrom mlps_dist.cli.forwarding import Forwarder\nForwarder().install()\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    os.kill(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "before the stage started" in err
