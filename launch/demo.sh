#!/usr/bin/env bash
# The main job on a fresh clone: generate the built-in synthetic H&E dataset (LUAD-HistoSeg
# folder layout), convert it to shards, run all four stages of MLPS on this machine and print
# the test metrics. About 10 minutes on 2 CPU cores; GPUs are used when present.
#
#   bash launch/demo.sh [RUN_DIR] [key=value ...]      # default RUN_DIR: runs/demo
#
# Rerunning the same command after an interruption continues where it stopped: finished
# files and stages are kept. DEMO_DATA (default data/demo) is where the dataset goes.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/venv.sh"
cd "$repo"
run_dir=${1:-runs/demo}
(($# > 0)) && shift
data=${DEMO_DATA:-data/demo}

if [[ ! -f "$data/shards/info.json" ]]; then
    python tools/make_synthetic.py --out "$data/raw" --train 1000 --val 100 --test 100 --size 96 --seed 0
    python tools/make_shards.py --layout luad --src "$data/raw" --out "$data/shards"
fi
exec bash launch/pipeline.sh configs/demo.yaml "$run_dir" "data.root=$data/shards" "$@"
