#!/usr/bin/env bash
# Create (once) and activate the project's Python environment; sourced by the README commands
# and CI. Re-installs only when pyproject.toml or the chosen builds change. One pip command pins
# torch together with everything else, so the resolver never swaps the intended torch build for
# another one pulled in by a dependency. Sourcing it leaves the caller's shell options alone.
#
#   MLPS_PYTHON=python3   use that interpreter with its packages as they are: no venv, nothing
#                         installed (an offline GPU node's image); `python` and `torchrun` on
#                         PATH then run it
#   MLPS_VENV=DIR         where the virtual environment lives (default: .venv in the repository)
#   MLPS_TORCH=BUILD      the torch build: auto (default) | cpu | cu126 | cu128 | cu130. auto takes
#                         cpu where no NVIDIA driver answers (nvidia-smi), cu130 with driver >= 580,
#                         cu126 with an older one
#   MLPS_TORCH_INDEX=URL  the package index for that build (default: the configured indexes for
#                         cu130 and for cpu when a +cpu wheel is among pip's find-links,
#                         https://download.pytorch.org/whl/BUILD otherwise)
#   MLPS_DALI=FLAVOUR     auto (default: cuda12 for cu12x builds, else cuda13, whose wheel also runs
#                         CPU pipelines) | cuda12 | cuda13 | none: the extra dali-cuda12/dali-cuda13
#   MLPS_TORCH_PIN        the torch requirement (default torch==2.13.0)
_mlps_venv() {
    local repo venv torch_pin build why dali index driver version spec extras want stamp links link found=""
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -n "${MLPS_PYTHON:-}" ]]; then
        local py shim
        py="$(command -v "$MLPS_PYTHON")" || { echo "[venv] MLPS_PYTHON=$MLPS_PYTHON: no such interpreter" >&2; return 2; }
        shim="${TMPDIR:-/tmp}/mlps-python-$(id -u)-$(printf '%s' "$py" | sha256sum | cut -c1-8)"
        mkdir -p "$shim" || return 1  # wrappers, not links: a venv's python must keep its own path
        printf '#!/bin/sh\nexec "%s" "$@"\n' "$py" >"$shim/python" &&
            printf '#!/bin/sh\nexec "%s" -m torch.distributed.run "$@"\n' "$py" >"$shim/torchrun" &&
            chmod +x "$shim/python" "$shim/torchrun" || return 1
        export PATH="$shim:$PATH"
        echo "[venv] MLPS_PYTHON: using $py and its packages as they are (no venv, nothing installed)" >&2
        return 0
    fi
    venv="${MLPS_VENV:-$repo/.venv}"
    torch_pin="${MLPS_TORCH_PIN:-torch==2.13.0}"
    build="${MLPS_TORCH:-auto}"
    if [[ "$build" == auto ]]; then
        driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
        if [[ -z "$driver" ]]; then
            build=cpu why="no NVIDIA driver found; MLPS_TORCH forces another"
        elif [[ "${driver%%.*}" =~ ^[0-9]+$ ]] && ((${driver%%.*} >= 580)); then
            build=cu130 why="NVIDIA driver $driver, >= 580; MLPS_TORCH forces another"
        else
            build=cu126 why="NVIDIA driver $driver, < 580: CUDA 12; MLPS_TORCH forces another"
        fi
    else
        why="MLPS_TORCH=$build"
    fi
    case "$build" in cpu | cu12? | cu13?) ;; *)
        echo "[venv] MLPS_TORCH=$build: use auto, cpu, cu126, cu128 or cu130" >&2; return 2 ;;
    esac
    dali="${MLPS_DALI:-auto}"
    [[ "$dali" == auto ]] && { [[ "$build" == cu12? ]] && dali=cuda12 || dali=cuda13; }
    case "$dali" in cuda12 | cuda13 | none) ;; *)
        echo "[venv] MLPS_DALI=$dali: use auto, cuda12, cuda13 or none" >&2; return 2 ;;
    esac
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "[venv] creating $venv" >&2
        python3 -m venv "$venv" || return 1
    fi
    index="${MLPS_TORCH_INDEX:-}"
    version="${torch_pin#torch==}"
    if [[ -z "$index" && "$build" == cpu ]]; then
        # A CPU machine whose pip finds a +cpu wheel locally (find-links) takes it with the plain
        # pin; elsewhere the plain pin would fetch the multi-GB CUDA wheel from PyPI.
        links="${PIP_FIND_LINKS:-} $("$venv/bin/python" -m pip config get global.find-links 2>/dev/null)"
        for link in $links; do
            compgen -G "${link#file://}/torch-$version+cpu-*.whl" >/dev/null && found=1
        done
        [[ -n "$found" ]] || index="https://download.pytorch.org/whl/cpu"
    elif [[ -z "$index" && "$build" != cu130 ]]; then
        index="https://download.pytorch.org/whl/$build"
        [[ "$torch_pin" == torch==* && "$version" != *+* ]] && torch_pin="torch==$version+$build"
    fi
    extras="test,export"
    [[ "$dali" != none ]] && extras="$extras,dali-$dali"
    stamp="$venv/.mlps-installed"
    want="$(sha256sum "$repo/pyproject.toml" | cut -c1-16) $torch_pin"
    [[ "$build/$dali/$index" != cpu/cuda13/ ]] && want="$want $build $dali $index"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "[venv] torch build $build ($why), DALI ${dali/none/not installed}${index:+, index $index}" >&2
        echo "[venv] installing dependencies ($torch_pin) ..." >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ${index:+--extra-index-url "$index"} \
            "$torch_pin" -e "$repo[$extras]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2
        spec="import torch, deepspeed, webdataset, tensorboard, onnx, onnxruntime"
        [[ "$dali" != none ]] && spec="$spec, nvidia.dali"
        "$venv/bin/python" -c "$spec" >/dev/null 2>&1 || {
            echo "[venv] install failed: see pip output above (MLPS_TORCH / MLPS_TORCH_INDEX choose the torch build; MLPS_PYTHON uses an existing environment)" >&2
            return 1
        }
        echo "$want" >"$stamp"
    fi
    export PATH="$venv/bin:$PATH"
    export VIRTUAL_ENV="$venv"
}
_mlps_venv || { _mlps_rc=$?; unset -f _mlps_venv; return $_mlps_rc 2>/dev/null || exit $_mlps_rc; }
unset -f _mlps_venv
