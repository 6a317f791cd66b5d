# Shell functions shared by launch/*.sh and slurm/*. Source it; do not run it.
#
# Defines: mlps_log, mlps_die, mlps_stage_module, mlps_stage_status, mlps_config_value, mlps_gpu_count,
# mlps_default_nproc, mlps_head_node, mlps_rdzv_port, mlps_trap_early, mlps_run_forwarding,
# mlps_check_config, mlps_print_metrics, mlps_worker_status and MLPS_PREEMPTED_EXIT (75, EX_TEMPFAIL:
# "preempted, rerun the same command to resume").

MLPS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MLPS_PREEMPTED_EXIT=75
MLPS_STAGES=(classifier masks segmenter evaluate)

mlps_die() {
    echo "[launch] error: $*" >&2
    exit 2
}

# Until a stage runs, a preemption notice just stops the launcher with 75 (nothing to save).
mlps_trap_early() {
    _mlps_child=""
    _mlps_preempted=0
    local sig
    for sig in TERM USR1 INT HUP; do
        # shellcheck disable=SC2064
        trap "_mlps_forward $sig" "$sig"
    done
}

mlps_log() {
    echo "[launch $(date +%H:%M:%S)] $*" >&2
}

# Stage name -> python module. A name with a dot is taken as a module as it is
# (e.g. mlps_dist.deploy.infer), so any entry point can be launched the same way.
mlps_stage_module() {
    case "$1" in
        classifier | train_classifier) echo mlps_dist.stages.train_classifier ;;
        masks | generate_masks) echo mlps_dist.stages.generate_masks ;;
        segmenter | train_segmenter) echo mlps_dist.stages.train_segmenter ;;
        evaluate) echo mlps_dist.stages.evaluate ;;
        *.*) echo "$1" ;;
        *) mlps_die "unknown stage '$1': use one of ${MLPS_STAGES[*]} (or a module name such as mlps_dist.deploy.infer)" ;;
    esac
}

# Where STAGE stands in RUN_DIR for CONFIG + overrides, asked of the run directory's owner
# (mlps_dist.run.artifacts): status 0 = finished *for this config and these inputs* (prints the
# stamp), 1 = to run (or resume), 2 = refused: a stale artefact (the message names what
# changed and how to proceed). Finished means the stage's stamp matches, not that its
# files exist.
#   mlps_stage_status STAGE CONFIG RUN_DIR [key=value ...]
mlps_stage_status() {
    local stage=$1 config=$2 run_dir=$3
    shift 3
    python -m mlps_dist.run.artifacts status --stage "$stage" --config "$config" "$@" "run_dir=$run_dir"
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

# Processes per node when NPROC_PER_NODE is not given: one per GPU, else 2 on a CPU machine.
mlps_default_nproc() {
    local gpus
    gpus=$(mlps_gpu_count)
    if ((gpus > 0)); then echo "$gpus"; else echo 2; fi
}

# First node of the SLURM allocation: the host of the c10d rendezvous.
mlps_head_node() {
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || mlps_die "several nodes need MASTER_ADDR (the host of node rank 0) when not under SLURM"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1
}

# Rendezvous port derived from the job id, so two jobs sharing a head node do not collide.
mlps_rdzv_port() {
    [[ -n "${SLURM_JOB_ID:-}" ]] || mlps_die "several nodes need MASTER_PORT (a free TCP port on MASTER_ADDR) when not under SLURM"
    echo $((20000 + SLURM_JOB_ID % 20000))
}

# Run a command in the background and pass TERM/USR1/INT/HUP on to it (as SIGTERM),
# so that a preemption notice or Ctrl-C reaches torchrun, which passes it to the workers;
# they finish the step, checkpoint and exit. Returns the command's status, or 75 when a
# preemption signal arrived and the command did not finish cleanly.
# The command runs detached from our process group (setsid) and receives the first
# signal only: a signal sent to the whole process group (or a second one) must not hit
# torchrun while it is already waiting for its workers to checkpoint (a second signal
# makes it quit waiting). Where every process already gets the signal from outside
# (SLURM signals all processes of a job step), set MLPS_FORWARD_SIGNALS=0: the status
# is still mapped to 75 and nothing is passed on twice.
mlps_run_forwarding() {
    local rc=0 prev sig
    _mlps_preempted=0
    _mlps_child=""
    for sig in TERM USR1 INT HUP; do
        # shellcheck disable=SC2064
        trap "_mlps_forward $sig" "$sig"
    done
    setsid "$@" &
    _mlps_child=$!
    while :; do
        _mlps_interrupted=0
        prev=$rc
        rc=0
        wait "$_mlps_child" || rc=$?
        ((_mlps_interrupted)) || break
        # A signal interrupted `wait`; wait again for the real status. If the child
        # had already been reaped, keep the status seen before.
        if ((rc == 127)) && ! kill -0 "$_mlps_child" 2>/dev/null; then rc=$prev; break; fi
    done
    if ((_mlps_preempted)) && ((rc != 0)); then
        mlps_log "stopped by a preemption signal (status $rc): rerun the same command to resume"
        rc=$MLPS_PREEMPTED_EXIT
    fi
    mlps_trap_early  # no stage runs now: a signal from here on just stops with 75
    return "$rc"
}

# The workers' own exit status, from the files runner.record_status leaves in
# MLPS_STATUS_DIR (torchrun turns any worker failure into 1): 1 if a worker hit a defect,
# else 75 if one was preempted, else 2 (a bad input); nothing when no worker left one.
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

# A trap handler: it must end with an explicit status (a bare `return` would hand back
# the interrupted `wait`'s status, which `set -e` turns into an exit).
_mlps_forward() {
    _mlps_interrupted=1
    if ((_mlps_preempted)); then
        mlps_log "received SIG$1 again: still waiting for pid $_mlps_child to checkpoint (kill -9 $$ to stop at once)"
        return 0
    fi
    _mlps_preempted=1
    if [[ -z "$_mlps_child" ]]; then
        mlps_log "received SIG$1 before the stage started: stopping (rerun to resume)"
        exit "$MLPS_PREEMPTED_EXIT"
    fi
    if [[ "${MLPS_FORWARD_SIGNALS:-1}" == 0 ]]; then
        mlps_log "received SIG$1: the stage got it too and checkpoints before it stops"
        return 0
    fi
    # Always as SIGTERM: the one signal every layer (stage.sh, torchrun, the workers)
    # treats as "checkpoint and stop", so Ctrl-C keeps the work done so far too.
    mlps_log "received SIG$1: asking pid $_mlps_child to checkpoint and stop (SIGTERM)"
    kill -s TERM "$_mlps_child" 2>/dev/null || true
    return 0
}

# Validate CONFIG + overrides once, before any job or process group starts: syntax,
# ranges, model names, CAM layers, class counts and splits against data.root
# (mlps_dist.stages.preflight). The pipeline reports test metrics, so evaluate.splits must
# include test. Prints evaluate.splits.
mlps_check_config() {
    python - "$@" <<'EOF'
import sys
from mlps_dist.config import load_config
from mlps_dist.core.errors import MlpsError
from mlps_dist.stages.preflight import check
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    check(cfg)
except MlpsError as exc:
    sys.exit(f"[launch] error: {exc}")
if "test" not in cfg.evaluate.splits:
    sys.exit("[launch] error: the pipeline ends with the test metrics: add test to evaluate.splits")
print(" ".join(cfg.evaluate.splits))
EOF
}

# One value of the resolved config: mlps_config_value KEY CONFIG [key=value ...]
mlps_config_value() {
    python - "$@" <<'EOF'
import sys
from mlps_dist.config import load_config
value = load_config(sys.argv[2], sys.argv[3:]).to_dict()
for part in sys.argv[1].split("."):
    value = value[part]
print(value)
EOF
}

# Print RUN/metrics/<split>.json as a table: overall scores and per-class IoU (%),
# with and without the classification gate when both are recorded.
mlps_print_metrics() {
    python - "$1" <<'EOF'
import json, math, sys
path = sys.argv[1]
gated = json.load(open(path))
columns = {"gated" if "ungated" in gated else "value": gated}
if isinstance(gated.get("ungated"), dict):
    columns["ungated"] = gated["ungated"]
def rows(m):
    out = {key: m[key] for key in ("miou", "fwiou", "acc", "macc") if key in m}
    iou = m.get("iou", {})
    items = iou.items() if isinstance(iou, dict) else enumerate(iou)
    out.update({f"IoU {name}": value for name, value in items})
    return out
table = {name: rows(m) for name, m in columns.items()}
def fmt(v):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"
print(f"test metrics (%) from {path}")
print(f"{'metric':<12}" + "".join(f"{name:>10}" for name in table))
for key in next(iter(table.values())):
    print(f"{key:<12}" + "".join(f"{fmt(col.get(key)):>10}" for col in table.values()))
EOF
}
