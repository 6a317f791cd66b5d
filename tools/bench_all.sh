#!/usr/bin/env bash
# Run every benchmark and append one JSON line per benchmark to bench/results-<hostname>.jsonl
# (see docs/benchmarks.md for the fields and the recorded figures).
#
#   bash tools/bench_all.sh          # CPU settings: under 10 minutes on 2 cores
#   bash tools/bench_all.sh --gpu    # a GPU node: 224 px patches, paper batch sizes, more steps
#
# BENCH_WORLDS (default 1,2; 1 with --gpu on a one-GPU node) sets the rank counts compared;
# BENCH_OUT another results file. The GPU check that fits one short allocation is
# tools/gpu_check.sh, not this (which takes 5-10 minutes with --gpu).
# A benchmark that fails is reported and the others still run; the exit status is then 1.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/venv.sh"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

profile=cpu
[[ "${1:-}" == "--gpu" ]] && profile=gpu
default_worlds=1,2
if [[ $profile == gpu ]] && (($(nvidia-smi -L 2>/dev/null | grep -c '^GPU') < 2)); then
    default_worlds=1  # two ranks need two GPUs (NCCL)
fi
worlds="${BENCH_WORLDS:-$default_worlds}"
out="${BENCH_OUT:-$repo/bench/results-$(hostname).jsonl}"
mkdir -p "$(dirname "$out")"
status=0

run_bench() {  # name, command...: append the one JSON line the command prints, if valid
    local name=$1 line rc=0
    shift
    echo "[bench_all] $name: $*" >&2
    local start=$SECONDS
    line="$("$@")" || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "[bench_all] $name exited with status $rc" >&2
        status=1
    fi
    if python tools/bench_common.py <<<"$line"; then
        printf '%s\n' "$line" | grep -v '^[[:space:]]*$' >> "$out"
        echo "[bench_all] $name: appended to $out ($((SECONDS - start)) s)" >&2
    else
        status=1
    fi
}

if [[ $profile == cpu ]]; then
    # One torch thread per process (rank): on a few shared cores, more threads per rank
    # oversubscribe them and make the figures depend on the machine's load more than on the code.
    export OMP_NUM_THREADS=1
    loader_args=(--n 256 --size 128 --batch 16 --steps 6 --workers 2)
    masks_args=(--size 128 --images 32 --reference-images 4 --batch-size 8)
    train_args=(--worlds "$worlds")
    slides_args=(--worlds "$worlds" --width 3072 --height 2048 --patch 96 --batch-size 16)
    infer_args=(--sides 2000)
else
    # 224 px and the paper batch sizes; bf16 as the paper configs would run on a GPU.
    loader_args=(--n 1024 --size 224 --batch 32 --steps 20 --workers 6 --image-formats png,jpeg)
    masks_args=(--model resnet38d --size 224 --images 128 --reference-images 8 --batch-size 32)
    train_args=(--worlds "$worlds" --size 224 --micro 16 --paper-micro 8 --steps 10 --paper-steps 5
                --parallel zero2 --paper-parallel zero2 --warmup 2 --threads 4 --workers 4 --timeout 300
                --precision bf16)
    slides_args=(--worlds "$worlds" --width 8192 --height 6144 --patch 224 --batch-size 64)
    infer_args=(--sides 4000,8000)
fi

run_bench loader python tools/bench_loader.py "${loader_args[@]}"
if [[ -f tools/bench_masks.py ]]; then
    for world in ${worlds//,/ }; do
        run_bench "masks x$world" torchrun --standalone --nproc_per_node="$world" tools/bench_masks.py \
            "${masks_args[@]}"
    done
else
    echo "[bench_all] tools/bench_masks.py not found: pseudo-mask benchmark not run" >&2
    status=1
fi
run_bench train python tools/bench_train.py "${train_args[@]}"
run_bench slides python tools/bench_slides.py "${slides_args[@]}"
run_bench infer python tools/bench_infer.py "${infer_args[@]}"
echo "[bench_all] results in $out" >&2
exit $status
