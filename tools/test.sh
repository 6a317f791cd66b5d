#!/usr/bin/env bash
# Run the test suite (creates .venv/ on first use). Extra arguments go to pytest,
# e.g.  bash tools/test.sh -k shards -x
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/venv.sh"
cd "$repo"
exec python -m pytest "$@"
