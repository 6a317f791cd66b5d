# Shell helpers shared by launch/*.sh and slurm/*. Source it; do not run it.
#
# Defines: mlps_die, mlps_stage_module, mlps_stage_artefact, mlps_default_nproc,
# mlps_head_node, mlps_rdzv_port, mlps_run_forwarding, mlps_print_metrics and
# MLPS_PREEMPTED_EXIT (75, EX_TEMPFAIL: "preempted, rerun the same command to resume").

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

# Stage name -> python module. A name with a dot is taken as a module as it is
# (e.g. mlps_dist.infer), so any entry point can be launched the same way.
mlps_stage_module() {
    case "$1" in
        classifier | train_classifier) echo mlps_dist.train_classifier ;;
        masks | generate_masks) echo mlps_dist.generate_masks ;;
        segmenter | train_segmenter) echo mlps_dist.train_segmenter ;;
        evaluate) echo mlps_dist.evaluate ;;
        *.*) echo "$1" ;;
        *) mlps_die "unknown stage '$1': use one of ${MLPS_STAGES[*]} (or a module name such as mlps_dist.infer)" ;;
    esac
}

# The file whose existence means "this stage is finished" (docs/architecture.md).
# The pseudo-mask stage has no single file that proves completeness (its manifest is
# written as chunks finish), so it is always started and decides for itself.
mlps_stage_artefact() {
    local stage=$1 run_dir=$2
    case "$stage" in
        classifier) echo "$run_dir/classifier/model.pt" ;;
        segmenter) echo "$run_dir/segmenter/model.pt" ;;
        evaluate) echo "$run_dir/metrics/test.json" ;;
        *) echo "" ;;
    esac
}

# Processes per node when NPROC_PER_NODE is not given: one per GPU, else 2 on a CPU machine.
mlps_default_nproc() {
    local gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ "$gpus" == 0 ]]; then
        gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    fi
    if [[ "$gpus" -gt 0 ]]; then echo "$gpus"; else echo 2; fi
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

# Run a command in the background and forward TERM/USR1/INT/HUP to it, so that a
# preemption notice reaches torchrun (which passes it to the workers; they finish the
# step, checkpoint and exit). Returns the command's status, or 75 when a preemption
# signal arrived and the command did not finish cleanly.
mlps_run_forwarding() {
    local rc=0 prev sig
    _mlps_preempted=0
    "$@" &
    _mlps_child=$!
    for sig in TERM USR1 INT HUP; do
        # shellcheck disable=SC2064
        trap "_mlps_forward $sig" "$sig"
    done
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
    trap - TERM USR1 INT HUP
    if ((_mlps_preempted)) && ((rc != 0)); then
        mlps_log "stopped by a preemption signal (status $rc): rerun the same command to resume"
        rc=$MLPS_PREEMPTED_EXIT
    fi
    return "$rc"
}

_mlps_forward() {
    _mlps_interrupted=1
    _mlps_preempted=1
    mlps_log "received SIG$1: passing it on (pid $_mlps_child) to checkpoint and stop"
    kill -s "$1" "$_mlps_child" 2>/dev/null || true
}

# Print RUN/metrics/<split>.json as a table: overall scores, then per-class IoU.
mlps_print_metrics() {
    python - "$1" <<'EOF'
import json, math, sys
path = sys.argv[1]
m = json.load(open(path))
def fmt(v):
    return "nan" if isinstance(v, float) and math.isnan(v) else (f"{100 * v:6.2f}" if isinstance(v, float) else str(v))
print(f"== {path}")
for key in ("miou", "fwiou", "acc", "macc"):
    if key in m:
        print(f"  {key:<8} {fmt(m[key])}")
classes = m.get("classes") or [str(i) for i in range(len(m.get("iou", [])))]
for name, iou in zip(classes, m.get("iou", [])):
    print(f"  IoU {name:<6} {fmt(iou)}")
EOF
}
