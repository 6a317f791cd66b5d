#!/usr/bin/env bash
# The GPU check in one command, for any node with CUDA (tools/gpu_check.py): the environment
# first, then each CUDA-path check in its own process with its own time-out, one summary line
# per check and the log folder at the end, whatever fails or runs out of time. Sized for one
# H100/H200: at most 8 minutes (GPU_CHECK_SECONDS, default 450 s for the checks), --quick under 4.
#
#   bash tools/gpu_check.sh                       # the project's venv (tools/venv.sh)
#   MLPS_PYTHON=python3 bash tools/gpu_check.sh   # that interpreter as it is: nothing installed
#   bash tools/gpu_check.sh --quick               # the most informative half
#   bash tools/gpu_check.sh --only amp,masks      # some checks; --with-demo adds the demo
#
# Exit status: 0 nothing failed, 1 a check failed or ran out of time, 2 no CUDA device or no
# usable Python environment.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if ! source "$repo/tools/venv.sh"; then
    command -v python3 >/dev/null && python3 tools/gpu_check.py --env-only  # what python3 here would have
    echo "FAIL  setup      tools/venv.sh could not prepare the environment (see above); MLPS_PYTHON=python3 uses an existing one"
    echo "gpu_check: no usable Python environment: nothing checked; exit status 2"
    exit 2
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec python tools/gpu_check.py "$@"
