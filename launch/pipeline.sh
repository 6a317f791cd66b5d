#!/usr/bin/env bash
# The whole pipeline on this node (or, with NNODES etc., on each node of a group):
# `mlps pipeline` in the repository's venv. Classifier -> pseudo masks -> segmenter ->
# evaluate, resumable; then RUN/MODEL_CARD.md and the test metrics.
#
#   launch/pipeline.sh [--restart-from STAGE] CONFIG RUN [key=value ...]
#
# Environment and exit status (0 done, 2 bad config or refused run directory, 75 preempted:
# rerun the same command to resume, else the failing stage's): python -m mlps_dist pipeline --help.
set -euo pipefail
# Until the first stage starts, a preemption notice just stops with 75 (nothing to save yet).
trap 'exit 75' TERM USR1 INT HUP
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tools/venv.sh"
exec python -m mlps_dist pipeline "$@"
