#!/usr/bin/env bash
# Run the whole pipeline on this node (or, with NNODES etc., on each node of a group):
# classifier -> pseudo masks -> segmenter -> evaluate, then write RUN/MODEL_CARD.md and print
# the test metrics.
#
#   launch/pipeline.sh CONFIG RUN_DIR [key=value ...]
#
# The overrides go to every stage. Finished stages are skipped; after a crash or a
# preemption, rerun the same command: the interrupted stage resumes from its last
# checkpoint. Environment: as for launch/stage.sh (NPROC_PER_NODE, MAX_RESTARTS, ...).
#
# Exit status: 0 when all stages are done; 75 when a stage was preempted (rerun to
# resume); otherwise the failing stage's status.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
mlps_trap_early
source "$MLPS_REPO/tools/venv.sh"

if (($# < 2)); then
    echo "usage: launch/pipeline.sh CONFIG RUN_DIR [key=value ...]" >&2
    exit 2
fi
config=$1 run_dir=$2
shift 2
[[ -f "$config" ]] || mlps_die "config file '$config' does not exist: pass a YAML from configs/"
eval_splits=$(mlps_check_config "$config" "run_dir=$run_dir" "$@") || exit 2

for stage in "${MLPS_STAGES[@]}"; do
    # shellcheck disable=SC2086  # the split names are words
    if proof=$(mlps_stage_done "$stage" "$run_dir" $eval_splits); then
        mlps_log "$stage: finished ($proof exists), skipping"
        continue
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
python -m mlps_dist.model_card --run "$run_dir" ||
    mlps_log "warning: writing $run_dir/MODEL_CARD.md failed; rerun: python -m mlps_dist.model_card --run $run_dir"
mlps_print_metrics "$run_dir/metrics/test.json"
