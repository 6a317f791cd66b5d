#!/usr/bin/env bash
# The main job on a fresh clone: generate the built-in synthetic H&E dataset (LUAD-HistoSeg
# folder layout), convert it to shards, run all four stages of MLPS on this machine and print
# the test metrics; then segment one synthetic whole slide with the trained run and print where
# its class map and overlay are. About 10 minutes on 2 CPU cores; GPUs are used when present.
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
    python -m mlps_dist synthetic --out "$data/raw" --train 600 --val 80 --test 100 --size 96 --seed 0
    # The synthetic textures are drawn at about 1 micron per pixel.
    python -m mlps_dist shards --layout luad --src "$data/raw" --out "$data/shards" --mpp 1.0
fi
python -m mlps_dist pipeline configs/demo.yaml "$run_dir" "data.root=$data/shards" "$@"

# Whole slides: one synthetic slide (pyramidal TIFF + QuPath GeoJSON), segmented by the run.
python -m mlps_dist synthetic-slides --out "$data/wsi" --count 1 --width 768 --height 512 --cell 250
python -m mlps_dist segment --run "$run_dir" --slides "$data/wsi/slides" --out "$run_dir/slides" \
    --model-mpp 1.0 --map-mpp 4
echo "slide overlay: $run_dir/slides/synthslide00/overlay.png (areas in $run_dir/slides/summary.csv)"
