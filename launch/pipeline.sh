#!/usr/bin/env bash
# Run the whole pipeline on this node (or, with NNODES etc., on each node of a group):
# classifier -> pseudo masks -> segmenter -> evaluate, then write RUN/MODEL_CARD.md and print
# the test metrics.
#
#   launch/pipeline.sh [--restart-from STAGE] CONFIG RUN_DIR [key=value ...]
#
# The overrides go to every stage. A stage is skipped when its stamp in RUN_DIR says it
# was produced by this config and these inputs (mlps_dist.run.artifacts). After a crash or a
# preemption, rerun the same command: the interrupted stage resumes from its last
# checkpoint. When a setting or an input of a finished (or partly trained) stage changed,
# the pipeline refuses and names what changed: use a new RUN_DIR, or --restart-from STAGE
# to move that stage and the ones after it to RUN_DIR/superseded/<time>/ and redo them.
# Changed evaluation settings just evaluate again. Environment: as for launch/stage.sh.
#
# Exit status: 0 when all stages are done; 75 when a stage was preempted (rerun to
# resume); 2 for a bad config or a refused run directory; otherwise the failing stage's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
mlps_trap_early
source "$MLPS_REPO/tools/venv.sh"

restart_from=""
if [[ "${1:-}" == --restart-from ]]; then
    restart_from=${2:-}
    shift 2 || true
    [[ " ${MLPS_STAGES[*]} " == *" $restart_from "* ]] || mlps_die "--restart-from needs one of: ${MLPS_STAGES[*]}"
fi
if (($# < 2)); then
    echo "usage: launch/pipeline.sh [--restart-from STAGE] CONFIG RUN_DIR [key=value ...]" >&2
    exit 2
fi
config=$1 run_dir=$2
shift 2
[[ -f "$config" ]] || mlps_die "config file '$config' does not exist: pass a YAML from configs/"
mlps_check_config "$config" "run_dir=$run_dir" "$@" >/dev/null || exit 2
if [[ -n "$restart_from" ]]; then
    python -m mlps_dist.run.artifacts restart --from "$restart_from" --config "$config" "$@" "run_dir=$run_dir" || exit $?
fi

for stage in "${MLPS_STAGES[@]}"; do
    state=0
    proof=$(mlps_stage_status "$stage" "$config" "$run_dir" "$@") || state=$?
    if ((state == 0)); then
        mlps_log "$stage: finished for this config (${proof#*: done: }), skipping"
        continue
    elif ((state != 1)); then
        mlps_log "$stage: refused (see above); nothing was changed in $run_dir"
        exit 2
    fi
    status=0
    mlps_run_forwarding "$here/stage.sh" "$stage" "$config" "$run_dir" "$@" || status=$?
    if ((status == MLPS_PREEMPTED_EXIT)); then
        mlps_log "$stage was preempted and checkpointed: rerun the same command to resume"
        exit "$MLPS_PREEMPTED_EXIT"
    elif ((status != 0)); then
        mlps_log "$stage failed with status $status: fix the cause and rerun the same command to resume"
        exit "$status"
    fi
done
# The model card (RUN/MODEL_CARD.md) describes the finished run; tools/export.py copies it.
python -m mlps_dist.run.model_card --run "$run_dir" ||
    mlps_log "warning: writing $run_dir/MODEL_CARD.md failed; rerun: python -m mlps_dist.run.model_card --run $run_dir"
mlps_print_metrics "$run_dir/metrics/test.json"
