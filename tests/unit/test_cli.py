"""The mlps command (mlps_dist/__main__.py): the listing, --version, unknown commands, and
every subcommand's --help with its defaults, run as a user runs them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlps_dist
from mlps_dist.__main__ import load
from mlps_dist.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]
CONTRACT = (
    "pipeline",
    "stage",
    "status",
    "shards",
    "mosaics",
    "tile",
    "segment",
    "infer",
    "export",
    "visualize",
    "inspect",
    "config",
    "card",
    "classifier",
    "masks",
    "segmenter",
    "evaluate",
)


def mlps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlps_dist", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_help_lists_every_command_with_its_summary_without_loading_torch():
    code = (
        "import sys; from mlps_dist.__main__ import main; status = main(['--help']); "
        "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(status)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("no torch")
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert set(CONTRACT) <= listed == set(COMMANDS)
    assert "not available" not in proc.stdout, proc.stdout


def test_version_prints_the_package_version():
    proc = mlps("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mlps-dist {mlps_dist.__version__}"


def test_an_unknown_command_is_named_in_one_line_with_the_commands_exit_2():
    proc = mlps("trian", "--config", "x")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "'trian'" in proc.stderr and "pipeline" in proc.stderr


def shows_a_default(action) -> bool:
    default = action.default
    return (
        bool(action.help)
        and action.option_strings
        and not action.required
        and default not in (None, "", argparse.SUPPRESS)
        and default is not False
    )


# The stage names run the stage modules (their parser is the stage session's, config.parse_cli).
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help_with_defaults(command, monkeypatch, capsys):
    built = []
    original = argparse.ArgumentParser.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", spy)
    try:
        status = load(command)(["--help"])
    except SystemExit as exc:
        status = exc.code
    out = capsys.readouterr().out
    assert status == 0 and out.startswith(f"usage: mlps {command} "), out
    assert built and all(issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter) for p in built)
    if any(shows_a_default(a) for p in built for a in p._actions):
        assert "(default:" in out


STAGES = ("classifier", "masks", "segmenter", "evaluate")


@pytest.mark.parametrize("command", STAGES)
def test_a_stage_help_shows_its_usage_and_how_to_launch_it(command, capsys):
    status = load(command)(["--help"])  # the stage's runner turns argparse's exit into a status
    out = capsys.readouterr().out
    skip_bad = " [--skip-bad]" if command in ("masks", "evaluate") else ""
    assert status == 0 and out.startswith(f"usage: mlps {command} CONFIG [--run RUN]{skip_bad} [key=value ...]\n")
    assert "--run RUN" in out and "(default: the config's run_dir)" in out
    assert f"mlps stage {command} CONFIG RUN" in out
    assert f"torchrun --nproc-per-node 2 -m mlps_dist -- {command} CONFIG --run RUN" in out


@pytest.mark.parametrize("command", STAGES)
def test_a_stage_module_docstring_shows_the_mlps_launch_commands(command):
    import importlib

    doc = importlib.import_module(COMMANDS[command][0]).__doc__
    assert f"    mlps stage {command} CONFIG RUN " in doc
    assert f"    torchrun --nproc-per-node 2 -m mlps_dist -- {command} CONFIG --run RUN\n" in doc
    assert "--config" not in doc and "run_dir=" not in doc and "-m mlps_dist.stages" not in doc


def test_the_same_help_through_a_double_dash_as_under_torchrun():
    assert mlps("--", "tile", "--help").stdout == mlps("tile", "--", "--help").stdout == mlps("tile", "--help").stdout


def test_one_spelling_per_concept():
    segment = mlps("segment", "--help").stdout
    assert "--slide-mpp" in segment and "--mpp MPP" not in segment and "--run-dir" not in segment
    tile = mlps("tile", "--help").stdout
    assert "--mpp MPP" in tile and "--slide-mpp" in tile
    infer = mlps("infer", "--help").stdout
    assert "--run RUN" in infer and "--run-dir" not in infer
    assert "--out OUT" in mlps("inspect", "--help").stdout
