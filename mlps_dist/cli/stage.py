"""``mlps stage STAGE CONFIG RUN [key=value ...]``: one stage of the pipeline on this node with
torchrun (or on each node of a group: NNODES, NODE_RANK, MASTER_ADDR, ...; see
mlps_dist.cli.torchrun).

Exit status: the stage's (the workers' own, not torchrun's 1: 2 = bad input); 75 means
preempted (a checkpoint was written): rerun the same command to resume. A finished stage
exits 0 at once, so rerunning is always safe.
"""

from __future__ import annotations

from mlps_dist.cli.forwarding import Forwarder
from mlps_dist.cli.launching import forwarding_enabled, guarded, load

HELP = "one stage (classifier, masks, segmenter, evaluate) on this node under torchrun"
EPILOG = """environment (all optional):
  NPROC_PER_NODE   processes on this node (default: one per GPU, or 2 on a CPU machine)
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID
                   several nodes: the c10d rendezvous (defaults under SLURM: from the job)
  MAX_RESTARTS     elastic restarts of the worker group after a worker dies (default 0)

exit status: 0 done; 2 bad input (named in one line); 75 preempted, checkpointed: rerun the
same command to resume; 1 a defect (the traceback is above)."""


def build_parser():
    from mlps_dist.cli import parser
    from mlps_dist.cli.torchrun import STAGE_MODULES

    p = parser("stage", HELP, EPILOG)
    p.add_argument("stage", metavar="STAGE", help=f"one of {', '.join(STAGE_MODULES)}")
    p.add_argument("config", metavar="CONFIG", help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("run", metavar="RUN", help="run directory (resumed where it stopped)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (classifier.epochs=2)")
    return p


def main(argv: list[str]) -> int:
    # First: from here on a preemption notice stops the command with 75 instead of killing it.
    forwarder = Forwarder(forward=forwarding_enabled()).install()
    return guarded(lambda: _stage(forwarder, build_parser().parse_intermixed_args(argv)))


def _stage(forwarder: Forwarder, args) -> int:
    from mlps_dist.cli.torchrun import run_stage, stage_module

    stage_module(args.stage)  # an unknown stage is refused before anything else
    cfg = load(args.config, args.overrides, args.run)
    return run_stage(forwarder, args.stage, args.config, args.run, args.overrides, cfg.dist.shutdown_timeout_s)
