"""``mlps status CONFIG RUN [key=value ...]``: where each stage of RUN stands for this config and
these inputs, as mlps pipeline would find it (mlps_dist.run.artifacts), one line per stage:

    done      its stamp matches: the pipeline skips it
    ready     to run: nothing of it yet, its input is there
    resumes   to run: it stopped part way (a checkpoint, written mask chunks) and goes on from there
    waiting   the stage before it is not finished
    stale     made from other settings or inputs: the pipeline refuses (the line names what
              changed and how to go on)

Exit status: 0 when every stage shown is done, 1 when there is work left, 2 when one is stale.
Reads only; starts nothing.
"""

from __future__ import annotations

from mlps_dist.cli.launching import guarded, load
from mlps_dist.core import layout
from mlps_dist.core.errors import InputError
from mlps_dist.run import artifacts

HELP = "each stage's state in a run directory: done, ready, resumes, waiting or stale"


def build_parser():
    from mlps_dist.cli import parser

    p = parser("status", HELP, "exit status: 0 all done, 1 work left, 2 a stale stage (refused by mlps pipeline)")
    p.add_argument("config", metavar="CONFIG", help="experiment YAML the run is (to be) made with")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the dotted overrides the run is made with")
    p.add_argument("--stage", choices=artifacts.STAGES, help="this stage only (default: all four)")
    p.add_argument(
        "--progress",
        action="store_true",
        help="print a token that changes whenever --stage makes durable progress (a checkpoint, a mask "
        "chunk, a stamp), for requeue decisions (slurm/stage.sbatch)",
    )
    return p


def main(argv: list[str]) -> int:
    return guarded(lambda: _status(build_parser().parse_intermixed_args(argv)))


def _status(args) -> int:
    cfg = load(args.config, args.overrides, args.run)
    if args.progress:
        if not args.stage:
            raise InputError("mlps status: --progress needs --stage STAGE")
        print(artifacts.progress_token(cfg, args.stage))
        return 0
    states = [artifacts.status(cfg, stage) for stage in ([args.stage] if args.stage else artifacts.STAGES)]
    for st in states:
        shown, detail = describe(cfg.run_dir, st)
        print(f"{st.stage:<11}{shown:<9}{detail}")
    if any(st.state == "stale" for st in states):
        return 2
    return 0 if all(st.state == "done" for st in states) else 1


def describe(run: str, st: artifacts.Status) -> tuple[str, str]:
    """The state as the table shows it, and its detail."""
    if st.state != "todo":
        return st.state, st.message.removeprefix(f"{st.stage}: ")
    partial = _partial_work(run, st.stage)
    if partial:
        return "resumes", f"from {partial}"
    return "ready", st.message.removeprefix(f"{st.stage}: ")


def _partial_work(run: str, stage: str) -> str:
    """What a stage that is not finished has kept so far ("" for nothing)."""
    if stage in layout.TRAINED:
        steps = sorted(p.name for p in layout.checkpoints_dir(run, stage).glob("step-*") if not p.name.endswith(".tmp"))
        return f"checkpoint {steps[-1]}" if steps else ""
    if stage == "masks":
        chunks = len(list(layout.masks_dir(run).glob("*.tar")))
        return f"{chunks} mask chunk(s) written" if chunks else ""
    return ""
