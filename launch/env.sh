# Shell functions shared by slurm/*. Source it; do not run it. (The launchers themselves are
# the mlps command: launch/stage.sh and launch/pipeline.sh run `python -m mlps_dist stage|pipeline`.)
#
# Defines: mlps_log, mlps_die, mlps_gpu_count, mlps_head_node, mlps_rdzv_port, mlps_worker_status,
# MLPS_STAGES and MLPS_PREEMPTED_EXIT (75, EX_TEMPFAIL: "preempted, rerun the same command to resume").

MLPS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MLPS_PREEMPTED_EXIT=75
MLPS_STAGES=(classifier masks segmenter evaluate)

mlps_die() {
    echo "[launch] error: $*" >&2
    exit 2
}

mlps_log() {
    echo "[launch $(date +%H:%M:%S)] $*" >&2
}

# GPUs on this node (nvidia-smi; CUDA_VISIBLE_DEVICES narrows them), 0 on a CPU machine.
mlps_gpu_count() {
    local gpus=0
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${gpus:-0}"
}

# First node of the SLURM allocation: the host of the c10d rendezvous.
mlps_head_node() {
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || mlps_die "several nodes need MASTER_ADDR (the host of node rank 0) when not under SLURM"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1
}

# Rendezvous port derived from the job id, so two jobs sharing a head node do not collide
# (the same rule as mlps_dist/cli/torchrun.py).
mlps_rdzv_port() {
    [[ -n "${SLURM_JOB_ID:-}" ]] || mlps_die "several nodes need MASTER_PORT (a free TCP port on MASTER_ADDR) when not under SLURM"
    echo $((20000 + SLURM_JOB_ID % 20000))
}

# The workers' own exit status, from the files mlps_dist/core/runner.py's record_status leaves
# in MLPS_STATUS_DIR (torchrun and srun turn any worker failure into 1 or the highest task
# status): 1 if a worker hit a defect, else 75 if one was preempted, else 2 (a bad input);
# nothing when no worker left one.
mlps_worker_status() {
    local folder=$1 file code worst=""
    for file in "$folder"/rank-*; do
        [[ -f "$file" ]] || continue
        code=$(<"$file")
        case "$code" in
            1) worst=1 ;;
            75) [[ "$worst" == 1 ]] || worst=75 ;;
            *) [[ -n "$worst" ]] || worst=$code ;;
        esac
    done
    echo "$worst"
}
