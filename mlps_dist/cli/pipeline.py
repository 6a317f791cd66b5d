"""``mlps pipeline CONFIG RUN [key=value ...] [--restart-from STAGE]``: the whole pipeline on this
node (or, with NNODES etc., on each node of a group): classifier -> pseudo masks -> segmenter
-> evaluate, each under torchrun (mlps_dist.cli.torchrun); then RUN/MODEL_CARD.md and the test
metrics.

The overrides go to every stage. A stage is skipped when its stamp in RUN says it was made by
this config and these inputs (mlps_dist.run.artifacts). After a crash or a preemption, rerun
the same command: the interrupted stage resumes from its last checkpoint. When a setting or an
input of a finished (or partly trained) stage changed, the pipeline refuses and names what
changed: use a new RUN, or --restart-from STAGE to move that stage and the ones after it to
RUN/superseded/<time>/ and redo them. Changed evaluation settings just evaluate again.
"""

from __future__ import annotations

import json

from mlps_dist.cli.forwarding import Forwarder, log
from mlps_dist.cli.launching import forwarding_enabled, guarded, load
from mlps_dist.core.errors import EXIT_PREEMPTED, InputError

HELP = "the whole pipeline (classifier, masks, segmenter, evaluate), resumable; then the model card and test metrics"
STAGES = ("classifier", "masks", "segmenter", "evaluate")  # mlps_dist.run.artifacts.STAGES, without importing it
EPILOG = """environment: as for mlps stage (NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
RDZV_ID, MAX_RESTARTS; mlps stage --help).

exit status: 0 when all stages are done; 75 when a stage was preempted (rerun to resume);
2 for a bad config or a refused run directory; otherwise the failing stage's."""


def build_parser():
    from mlps_dist.cli import parser

    p = parser("pipeline", HELP, EPILOG)
    p.add_argument("config", metavar="CONFIG", help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("run", metavar="RUN", help="run directory (created; resumed where it stopped)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides for every stage")
    p.add_argument(
        "--restart-from",
        metavar="STAGE",
        choices=STAGES,
        help=f"first move STAGE and the stages after it to RUN/superseded/<time>/, then redo them "
        f"({', '.join(STAGES)})",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only check CONFIG + overrides against the models and data.root, start nothing",
    )
    return p


def check_pipeline_config(config: str, overrides: list[str], run: str):
    """Every check that can fail before the first stage starts (mlps_dist.stages.session.check),
    and the one of the pipeline itself: it ends with the test metrics."""
    from mlps_dist.stages.session import check

    cfg = load(config, overrides, run)
    check(cfg)
    if "test" not in cfg.evaluate.splits:
        raise InputError("the pipeline ends with the test metrics: add test to evaluate.splits")
    return cfg


def main(argv: list[str]) -> int:
    # First: from here on a preemption notice stops the command with 75 instead of killing it.
    forwarder = Forwarder(forward=forwarding_enabled()).install()
    return guarded(lambda: _pipeline(forwarder, build_parser().parse_intermixed_args(argv)))


def _pipeline(forwarder: Forwarder, args) -> int:
    from mlps_dist.cli.torchrun import run_stage
    from mlps_dist.run import artifacts

    cfg = check_pipeline_config(args.config, args.overrides, args.run)
    if args.check:
        print(
            f"{args.config}: ok for a pipeline in {args.run} (models, CAM layers, classes and splits of "
            f"{cfg.data.root})"
        )
        return 0
    if args.restart_from:
        _restart(cfg, args.restart_from)
    for stage in STAGES:
        state = artifacts.status(cfg, stage)
        if state.state == "done":
            log(f"{stage}: finished for this config ({state.message}), skipping")
            continue
        if state.state == "stale":
            log(f"{stage}: refused: {state.message}; nothing was changed in {args.run}")
            return 2
        status = run_stage(forwarder, stage, args.config, args.run, args.overrides, cfg.dist.shutdown_timeout_s)
        if status == EXIT_PREEMPTED or (status == 0 and forwarder.preempted):
            log(f"{stage} was preempted and checkpointed: rerun the same command to resume")
            return EXIT_PREEMPTED
        if status != 0:
            log(f"{stage} failed with status {status}: fix the cause and rerun the same command to resume")
            return status
    _model_card(args.run)
    print_test_metrics(args.run)
    return 0


def _restart(cfg, stage: str) -> None:
    from mlps_dist.run.artifacts import restart
    from mlps_dist.run.lock import run_lock

    with run_lock(cfg.run_dir, f"restart from {stage}"):
        moved = restart(cfg, stage)
    log(
        f"--restart-from {stage}: moved to {moved}"
        if moved
        else f"--restart-from {stage}: nothing to move in {cfg.run_dir}"
    )


def _model_card(run: str) -> None:
    """RUN/MODEL_CARD.md describes the finished run (mlps export copies it); a failure to write it
    is said, but the trained run stands."""
    from mlps_dist.run import model_card

    try:
        model_card.write(run)
    except Exception as exc:  # noqa: BLE001 - the card is a report: any failure leaves the run as it is
        log(
            f"warning: writing the model card of {run} failed ({type(exc).__name__}: {exc}); rerun: "
            f"mlps card --run {run}"
        )


def print_test_metrics(run: str) -> None:
    """RUN/metrics/test.json as the evaluation's table: per-class IoU and the overall scores (%),
    with and without the classification gate."""
    from mlps_dist.core import layout
    from mlps_dist.stages.evaluate import summary_table

    path = layout.metrics_file(run, "test")
    print(f"test metrics (%) from {path}")
    print(summary_table(json.loads(path.read_text())), flush=True)
