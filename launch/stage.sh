#!/usr/bin/env bash
# One stage of the pipeline on this node with torchrun: `mlps stage` in the repository's venv.
#
#   launch/stage.sh STAGE CONFIG RUN [key=value ...]     (STAGE: classifier | masks | segmenter | evaluate)
#
# The other mlps commands (infer, segment, tile, ...) run under torchrun themselves:
#   torchrun --nproc-per-node N -m mlps_dist -- COMMAND ...
#
# Environment (NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID,
# MAX_RESTARTS) and exit status (0, 2 bad input, 75 preempted: rerun to resume, 1 a defect):
# python -m mlps_dist stage --help.
set -euo pipefail
# Until the stage starts, a preemption notice just stops with 75 (nothing to save yet).
trap 'exit 75' TERM USR1 INT HUP
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tools/venv.sh"
exec python -m mlps_dist stage "$@"
