#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment in .venv/.
# Sourced by the README commands; re-installs only when pyproject.toml changes.
# One pip command pins torch together with everything else, so the resolver never
# swaps the intended torch build for another one pulled in by a dependency.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
torch_pin="${MLPS_TORCH_PIN:-torch==2.13.0}"
stamp="$venv/.mlps-installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -c1-16) $torch_pin"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "[venv] creating $venv" >&2
    python3 -m venv "$venv"
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "[venv] installing dependencies ($torch_pin) ..." >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "$torch_pin" -e "$repo[test,export]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    "$venv/bin/python" -c "import torch, deepspeed, nvidia.dali, webdataset, tensorboard, onnx, onnxruntime" \
        >/dev/null 2>&1 || { echo "[venv] install failed: see pip output above" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
