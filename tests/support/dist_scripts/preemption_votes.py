"""The per-step preemption vote on every rank of a gloo job: one rank is signalled (its flag
set) before step SIGNAL_STEP; every rank records what PreemptionGuard.poll() answered at
each step until the first True, and what agreed() answers afterwards.

    torchrun --standalone --nproc_per_node=W tests/support/dist_scripts/preemption_votes.py OUT

OUT/votes-r<rank>.json: {"polls": [bool per step], "agreed": bool}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlps_dist import dist
from mlps_dist.train.preemption import PreemptionGuard

STEPS, SIGNAL_STEP, SIGNALLED_RANK = 6, 3, 1


def main(out: Path) -> None:
    dist.init()
    try:
        guard = PreemptionGuard()  # not entered: the flag is set directly below
        polls = []
        for step in range(STEPS):
            if step == SIGNAL_STEP and dist.get_rank() == SIGNALLED_RANK % dist.get_world_size():
                guard.flag = True
            polls.append(guard.poll())
            if polls[-1]:  # the engine checkpoints and stops here
                break
        record = {"polls": polls, "agreed": guard.agreed()}
        (out / f"votes-r{dist.get_rank()}.json").write_text(json.dumps(record))
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
