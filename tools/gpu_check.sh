#!/usr/bin/env bash
# The GPU checks in one command, for a node with CUDA (sized for one H100/H200: at most
# 8 minutes): the test tier marked `gpu` (tests/test_gpu.py: NCCL DDP and DeepSpeed steps,
# bf16/fp16 autocast, frozen SyncBatchNorm, DALI mixed decoding, mask pass, demo), then
# `tools/bench_all.sh --gpu` on one rank. Prints one summary line per check:
#
#   PASS  gpu-test  test_autocast_reaches_the_fp32_loss[bf16]  (4.1 s)
#   PASS  bench     loader: images/s torch 1510.2 ... (ratio vs PNG folder: ...)
#
#   bash tools/gpu_check.sh                 # GPU_CHECK_SECONDS (default 480) caps the whole run
#
# Exit status: 0 when every check passed, 1 when one failed or ran out of time, 2 without CUDA.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/venv.sh"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

budget=${GPU_CHECK_SECONDS:-480}
bench_share=${GPU_CHECK_BENCH_SECONDS:-200}  # the benchmarks' part of the budget
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "FAIL  setup     torch sees no CUDA device: run this on a GPU node (the CPU suite is tools/test.sh)"
    exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
start=$SECONDS
status=0

tests_budget=$((budget - bench_share))
timeout --signal=INT --kill-after=20 "$tests_budget" \
    python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$work/gpu.xml" \
    >"$work/pytest.log" 2>&1
rc=$?
((rc == 124)) && echo "FAIL  gpu-test  ran out of its ${tests_budget} s (see $work/pytest.log)"
((rc != 0)) && status=1

left=$((budget - (SECONDS - start)))
((left < 30)) && left=30
BENCH_WORLDS=1 BENCH_OUT="$work/bench.jsonl" timeout --kill-after=20 "$left" \
    bash tools/bench_all.sh --gpu 2>"$work/bench.log"
brc=$?
((brc == 124)) && echo "FAIL  bench     ran out of its ${left} s (see $work/bench.log)"
((brc != 0)) && status=1

python - "$work/gpu.xml" "$work/bench.jsonl" <<'PY' || status=1
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

xml_path, bench_path = map(Path, sys.argv[1:])
failed = False
if xml_path.is_file():
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "")
        word = {"failure": "FAIL", "error": "FAIL", "skipped": "SKIP"}.get(kind, "PASS")
        failed |= word == "FAIL"
        message = (case.find(kind).get("message") or "") if kind else ""
        detail = f"  {message.splitlines()[0][:160]}" if message else ""
        print(f"{word:5} gpu-test  {case.get('name')}  ({float(case.get('time', 0)):.1f} s){detail}")
else:
    print("FAIL  gpu-test  no test report (pytest did not finish)")
    failed = True
records = [json.loads(line) for line in bench_path.read_text().splitlines() if line.strip()] if bench_path.is_file() else []
for r in records:
    figures, ratio = r.get("figures", {}), r.get("ratio", {})
    if r["bench"] == "loader":
        text = "images/s " + ", ".join(f"{k} {v}" for k, v in figures["images_per_s"].items())
    elif r["bench"] == "train":
        text = ", ".join(f"{k} {v}" for k, v in list(ratio.items())[:6])
    else:
        text = ", ".join(f"{k} {v}" for k, v in list(ratio.items())[:4])
    print(f"PASS  bench     {r['bench']} (world {r.get('world_size')}): {text}")
if not records:
    print("FAIL  bench     no benchmark record")
    failed = True
sys.exit(1 if failed else 0)
PY
echo "gpu_check: $((SECONDS - start)) s, logs in $work; $([[ $status == 0 ]] && echo all passed || echo FAILED)"
exit $status
