#!/usr/bin/env bash
# Submit the four stages as SLURM jobs chained with afterok, and print their job ids.
#
#   slurm/submit_pipeline.sh CONFIG RUN [sbatch options ...] [-- key=value ...]
#
# The sbatch options (e.g. --nodes=2 --gpus-per-node=4 --time=12:00:00 --partition=gpu)
# apply to every stage; the key=value overrides after "--" go to every stage. Logs:
# RUN/slurm/<stage>-<jobid>.out (appended to when a job is requeued). Stages already
# finished exit at once, so resubmitting after a failure continues where it stopped.
# Output: one line "STAGE JOBID" per stage, in order.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../launch/env.sh"

if (($# < 2)); then
    echo "usage: slurm/submit_pipeline.sh CONFIG RUN [sbatch options ...] [-- key=value ...]" >&2
    exit 2
fi
config=$(realpath "$1")
run_dir=$(realpath -m "$2")
shift 2
sbatch_opts=()
while (($#)) && [[ "$1" != -- ]]; do
    sbatch_opts+=("$1")
    shift
done
(($#)) && shift  # the "--"
overrides=("$@")
[[ -f "$config" ]] || mlps_die "config file '$1' does not exist: pass a YAML from configs/"
command -v sbatch >/dev/null || mlps_die "sbatch not found: run this on a SLURM login node"
source "$MLPS_REPO/tools/venv.sh"
# Every check that can fail, before any job is queued (mlps pipeline --check starts nothing).
python -m mlps_dist pipeline --check "$config" "$run_dir" "${overrides[@]}" >/dev/null || exit 2
mkdir -p "$run_dir/slurm"

previous=""
for stage in "${MLPS_STAGES[@]}"; do
    dependency=()
    [[ -z "$previous" ]] || dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    job=$(sbatch --parsable --job-name="mlps-$stage" --chdir="$MLPS_REPO" \
        --output="$run_dir/slurm/$stage-%j.out" --export="ALL,MLPS_REPO=$MLPS_REPO" \
        "${dependency[@]}" "${sbatch_opts[@]}" \
        "$MLPS_REPO/slurm/stage.sbatch" "$stage" "$config" "$run_dir" "${overrides[@]}")
    previous=${job%%;*}  # --parsable prints "id" or "id;cluster"
    echo "$stage $previous"
done
