#!/usr/bin/env bash
# Run one stage of the pipeline on this node with torchrun.
#
#   launch/stage.sh STAGE CONFIG RUN_DIR [key=value ...]
#
# STAGE is classifier | masks | segmenter | evaluate (or a module such as mlps_dist.deploy.infer).
# RUN_DIR is passed to the stage as run_dir=RUN_DIR, followed by the overrides.
#
# Environment (all optional):
#   NPROC_PER_NODE   processes on this node (default: one per GPU, or 2 on a CPU machine)
#   NNODES           nodes taking part (default: SLURM_NNODES under SLURM, else 1)
#   NODE_RANK        this node's rank 0..NNODES-1 (default: SLURM_NODEID)
#   MASTER_ADDR      host of node rank 0: the c10d rendezvous (default: first node of the SLURM job)
#   MASTER_PORT      rendezvous port (default under SLURM: derived from the job id)
#   RDZV_ID          rendezvous id shared by all nodes (default: SLURM_JOB_ID, else "mlps")
#   MAX_RESTARTS     elastic restarts of the worker group after a worker dies (default 0);
#                    the stage resumes from its last checkpoint after each restart
#
# Exit status: the stage's (the workers' own, not torchrun's 1: 2 = bad input); 75 means
# preempted (a checkpoint was written): rerun the same command to resume. Finished stages
# exit 0 at once, so rerunning is always safe.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
mlps_trap_early
source "$MLPS_REPO/tools/venv.sh"

if (($# < 3)); then
    echo "usage: launch/stage.sh STAGE CONFIG RUN_DIR [key=value ...]   (STAGE: ${MLPS_STAGES[*]})" >&2
    exit 2
fi
stage=$1 config=$2 run_dir=$3
shift 3
module=$(mlps_stage_module "$stage")
[[ -f "$config" ]] || mlps_die "config file '$config' does not exist: pass a YAML from configs/"

nproc=${NPROC_PER_NODE:-$(mlps_default_nproc)}
nnodes=${NNODES:-${SLURM_NNODES:-1}}
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || mlps_die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || mlps_die "NNODES must be a positive integer, got '$nnodes'"
[[ "${MAX_RESTARTS:-0}" =~ ^[0-9]+$ ]] || mlps_die "MAX_RESTARTS must be a whole number, got '$MAX_RESTARTS'"

# How long torchrun lets the workers write their preemption checkpoint after passing a
# signal on, before it kills them: dist.shutdown_timeout_s (MLPS_SHUTDOWN_TIMEOUT overrides).
shutdown_timeout=${MLPS_SHUTDOWN_TIMEOUT:-$(mlps_config_value dist.shutdown_timeout_s "$config" "$@")} ||
    mlps_die "cannot read dist.shutdown_timeout_s from $config"
[[ "$shutdown_timeout" =~ ^[1-9][0-9]*$ ]] || mlps_die "the shutdown timeout must be a positive number of seconds, got '$shutdown_timeout'"

# SIGUSR1 is the usual SLURM preemption notice: torchrun passes it on like SIGTERM.
torchrun_args=(
    --nproc-per-node="$nproc"
    --max-restarts="${MAX_RESTARTS:-0}"
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    --shutdown-timeout="$shutdown_timeout"
)
# torchrun keeps one TCP store for all restarts of the worker group, and the keys the
# previous group left there (its gloo/NCCL addresses) can be read by the new group:
# its process group then connects to dead peers. With restarts allowed, let each new
# group bring up its own store instead.
if ((${MAX_RESTARTS:-0} > 0)); then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi
if ((nnodes == 1)); then
    torchrun_args+=(--standalone)
else
    node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
    [[ -n "$node_rank" ]] || mlps_die "NNODES=$nnodes needs NODE_RANK (0 on the node named by MASTER_ADDR)"
    master_addr=${MASTER_ADDR:-$(mlps_head_node)}
    master_port=${MASTER_PORT:-$(mlps_rdzv_port)}
    # Node rank 0 hosts the rendezvous store; the others only connect to it.
    is_host=$([[ "$node_rank" == 0 ]] && echo true || echo false)
    torchrun_args+=(
        --nnodes="$nnodes" --node-rank="$node_rank"
        --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port"
        --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-mlps}}" --rdzv-conf="is_host=$is_host"
    )
fi

mlps_log "$stage on $(hostname): $nnodes node(s) x $nproc process(es), run_dir=$run_dir"
# Each failing worker leaves its own status here (mlps_dist/core/runner.py); torchrun says 1.
# slurm/stage.sbatch passes a folder on the shared file system (all nodes' ranks) and reads it.
own_status_dir=0
if [[ -z "${MLPS_STATUS_DIR:-}" ]]; then
    MLPS_STATUS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mlps-status.XXXXXX")
    own_status_dir=1
fi
mkdir -p "$MLPS_STATUS_DIR"
export MLPS_STATUS_DIR
status=0
mlps_run_forwarding python -m torch.distributed.run "${torchrun_args[@]}" \
    -m "$module" --config "$config" "run_dir=$run_dir" "$@" || status=$?
if ((status == 1)); then
    worker=$(mlps_worker_status "$MLPS_STATUS_DIR")
    if [[ -n "$worker" && "$worker" != 1 ]]; then
        mlps_log "$stage: a worker exited with status $worker (its error is above torchrun's report)"
        status=$worker
    fi
fi
((own_status_dir == 0)) || rm -rf "$MLPS_STATUS_DIR"
exit "$status"
