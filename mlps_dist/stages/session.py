"""The one session every stage runs in: classifier, masks, segmenter and evaluate.

    STAGE = session.Stage("masks", "Stage 2: ...", prepare=prepare, work=work, skip_bad_key="masks.skip_bad")

    def main(argv: list[str] | None = None) -> int:
        return session.main(STAGE, argv)

On every rank, in this order (``run``):

1. parse ``CONFIG [--run RUN] [key=value ...]`` into the config (``parse``);
2. check the model names and CAM layers (``check_models``): a typo in a later stage's
   model or layers fails now, not hours later;
3. the stage's status (``artifacts.require_runnable``): stale artefacts and an unfinished or
   stale upstream are refused, naming what changed; a stage finished for this config says
   so and exits 0;
4. what the stamp will record (``artifacts.expected_inputs``), taken before any work;
5. the process group, the run lock (one job per run directory), the RunLog;
6. ``prepare(cfg)``: every check that can fail before the work starts. A FileNotFoundError
   or ValueError raised here names an input (a model file, a split, the shards), so it is
   reported as one (one line, exit 2) rather than as a defect;
7. ``work(cfg, log, prepared)``;
8. the stamp, written by rank 0 once the outputs are durable; every rank raises rank 0's
   error. Evaluate stamps each split as it finishes instead (``stamped=False``);
9. whatever happened: the log closed, the lock released, the process group torn down.

Exit status (mlps_dist.core.runner): 0 done (or already finished for this config), 2 a
problem with the config, data, checkpoint or run directory, 75 preempted (rerun the same
command to resume).

``check(cfg)`` is the whole pipeline's check before its first stage: the models and the
shards every stage reads (launch/env.sh runs it once).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlps_dist import dist
from mlps_dist.config import Config, ConfigError, TrainConfig, parse_cli, save_config
from mlps_dist.core import layout, runner
from mlps_dist.core.errors import InputError, MlpsError, Preempted
from mlps_dist.run import artifacts
from mlps_dist.run.lock import run_lock
from mlps_dist.run.runlog import RunLog
from mlps_dist.train import engine


@dataclass(frozen=True)
class Stage:
    name: str  # artifacts.STAGES: classifier | masks | segmenter | evaluate (also its `mlps` command)
    description: str  # the first line of --help
    prepare: Callable[[Config], Any]  # every check that can fail before the work; returns what work needs
    work: Callable[[Config, RunLog, Any], object]  # does the stage's work (its result is not used)
    skip_bad_key: str = ""  # e.g. "masks.skip_bad": the stage also takes --skip-bad
    tensorboard: bool = True  # RUN/tb/<stage>
    stamped: bool = True  # False: the work stamps its parts itself (evaluate: one stamp per split)


def main(stage: Stage, argv: list[str] | None = None) -> int:
    """The ``main()`` of a stage: ``run`` with its outcome mapped to an exit status."""
    return runner.run(lambda args: run(stage, args), argv)


def run(stage: Stage, argv: list[str] | None = None) -> int:
    """The stage session (see the module docstring); errors propagate to the caller."""
    cfg = parse(argv, stage)
    check_models(cfg)
    done = artifacts.require_runnable(cfg, stage.name)  # refuses stale artefacts, naming what changed
    if done.state == "done":
        if dist.is_main():
            print(f"{stage.name}: finished for this config ({done.message}), nothing to do")
        return 0
    inputs = artifacts.expected_inputs(cfg, stage.name) if stage.stamped else None
    dist.init(cfg.dist.backend, cfg.dist.timeout_s, force_group=_needs_group(cfg, stage.name))
    try:
        with run_lock(cfg.run_dir, stage.name):
            log = RunLog(cfg.run_dir, stage.name, tensorboard=stage.tensorboard)
            try:
                with inputs_named():
                    prepared = stage.prepare(cfg)
                stage.work(cfg, log, prepared)
                if stage.stamped:  # last: the stage is finished
                    dist.on_rank0(lambda: artifacts.write_stamp(cfg, stage.name, inputs) and None)
                return 0
            except Preempted as exc:
                log.info(str(exc))
                raise
            finally:
                log.close()
    finally:
        dist.teardown()


def parse(argv: list[str] | None, stage: Stage) -> Config:
    """``CONFIG [--run RUN] [--skip-bad] [key=value ...]`` (config.parse_cli). A config error
    is the same on every rank, so rank 0 alone reports it."""
    try:
        return parse_cli(argv, description=stage.description, skip_bad_key=stage.skip_bad_key, command=stage.name)
    except ConfigError as exc:
        exc.shared = True
        raise


def _needs_group(cfg: Config, stage: str) -> bool:
    """DeepSpeed needs a process group even in one plain process."""
    section = getattr(cfg, stage, None)
    return isinstance(section, TrainConfig) and section.parallel == "deepspeed"


@contextmanager
def inputs_named():
    """A FileNotFoundError or ValueError while a stage opens its inputs names the input (the
    model loaders and shard readers word them so): an input error, exit 2, not a defect."""
    try:
        yield
    except MlpsError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from exc


def train(cfg: Config, log: RunLog, task) -> None:
    """The work of a training stage: the resolved config beside the run, then the loop
    (train/engine.py) to the final model file."""
    if dist.is_main():
        save_config(cfg, layout.config_file(cfg.run_dir))
    engine.fit(cfg, getattr(cfg, task.stage), task, log)


# ---------------------------------------------------------------- checks before any work


def check(cfg: Config) -> None:
    """Every check of a pipeline's config that can fail, before its first stage starts.
    Config syntax and ranges are checked by ``mlps_dist.config``; this adds what needs the
    models and the shards."""
    check_models(cfg)
    check_shards(cfg)


def check_models(cfg: Config) -> None:
    """Model names and CAM layers (every rank finds the same problem: rank 0 reports it)."""
    try:
        _check_models(cfg)
    except ConfigError as exc:
        exc.shared = True
        raise


def _check_models(cfg: Config) -> None:
    import torch

    from mlps_dist.models import CLASSIFIER_NAMES, SEGMENTER_NAMES, create_classifier

    if cfg.classifier.model not in CLASSIFIER_NAMES:
        raise ConfigError(f"'classifier.model' is '{cfg.classifier.model}'; use one of {', '.join(CLASSIFIER_NAMES)}")
    if cfg.segmenter.model not in SEGMENTER_NAMES:
        raise ConfigError(f"'segmenter.model' is '{cfg.segmenter.model}'; use one of {', '.join(SEGMENTER_NAMES)}")
    with torch.device("meta"):  # the layer names only: no memory, no weights
        layers = create_classifier(cfg.classifier.model, 2).cam_layers
    unknown = [layer for layer in cfg.masks.layers if layer not in layers]
    if unknown:
        raise ConfigError(
            f"'masks.layers' names {unknown}, which classifier '{cfg.classifier.model}' does not "
            f"expose; choose from {list(layers)}"
        )


def check_shards(cfg: Config) -> None:
    """The splits every stage reads, with masks where evaluate needs them, and class counts."""
    from mlps_dist.data.shards import read_info

    info = read_info(cfg.data.root)
    splits, classes = info.get("splits", {}), list(info.get("classes", []))
    for split in ("train", "val", *cfg.evaluate.splits):
        if split not in splits:
            raise ConfigError(
                f"{cfg.data.root}/info.json has no '{split}' split (it has {sorted(splits)}); "
                f"rebuild the shards with it or fix data.root / evaluate.splits"
            )
    for split in cfg.evaluate.splits:
        if not splits[split].get("has_masks"):
            raise ConfigError(f"'evaluate.splits' names '{split}', which has no ground-truth masks in {cfg.data.root}")
    for key, wanted in (
        ("classifier.num_classes", cfg.classifier.num_classes),
        ("segmenter.num_classes", cfg.segmenter.num_classes),
    ):
        if wanted and wanted != len(classes):
            raise ConfigError(
                f"'{key}' = {wanted}, but {cfg.data.root}/info.json lists {len(classes)} classes "
                f"{classes}; fix one of them (0 = take it from the data)"
            )
