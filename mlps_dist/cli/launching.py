"""What the run commands (pipeline, stage, status, config) share: the config of a run as the
command line gives it, and errors turned into one line and an exit status."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mlps_dist.core.errors import InputError


def forwarding_enabled() -> bool:
    """False under slurm/stage.sbatch (MLPS_FORWARD_SIGNALS=0): SLURM signals every process of
    the job step itself, so the launcher must not pass a signal on a second time."""
    return os.environ.get("MLPS_FORWARD_SIGNALS", "1") != "0"


def load(config: str, overrides: list[str], run: str | None = None):
    """CONFIG + overrides (+ RUN as run_dir), resolved and validated; a missing file is named."""
    from mlps_dist.config import load_config, with_run_dir

    if not Path(config).is_file():
        raise InputError(f"config file '{config}' does not exist: pass a YAML file, e.g. one from configs/")
    return load_config(config, with_run_dir(overrides, run))


def guarded(body: Callable[[], int | None]) -> int:
    """``body()``'s status; an error becomes the house's one line and status (2 for a bad
    input, 1 with the traceback for a defect: mlps_dist.core.runner.report). Unlike
    runner.run, nothing is left in MLPS_STATUS_DIR: that folder holds the workers' statuses,
    and a launcher is not one of them."""
    from mlps_dist.core import runner

    try:
        status = body()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - mapped the one way every entry point maps them
        return runner.report(exc)
    return 0 if status is None else int(status)
