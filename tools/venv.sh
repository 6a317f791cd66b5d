#!/usr/bin/env bash
# Prepare the project's Python environment and put it first on PATH. Sourced by the README
# commands, the launchers and CI (`source tools/venv.sh`); run as a command it only installs:
#
#   bash tools/venv.sh             create / update the environment
#   bash tools/venv.sh --dry-run   print the torch build it chooses for this machine, why, and the
#                                  pip command; create and install nothing
#   bash tools/venv.sh --system    the same as MLPS_VENV=none (may be combined with --dry-run)
#
# (Sourced, it reads no arguments: `source` hands a script its caller's, e.g. tools/test.sh's
# pytest flags.) It prints one line saying which torch build it chose and why, re-installs only
# when pyproject.toml or a choice changes, and leaves the caller's shell options alone. One pip
# command pins torch together with everything else, so the resolver never swaps the chosen torch
# build for another one pulled in by a dependency.
#
#   MLPS_TORCH=BUILD      the torch build: auto (default) | cpu | cu126 | cu128 | cu130. auto takes
#                         cpu where no NVIDIA driver answers nvidia-smi, cu130 with driver >= 580,
#                         cu126 with driver >= 525, cpu with an older one
#   MLPS_VENV=DIR         where the virtual environment lives (default: .venv in the repository)
#   MLPS_VENV=none        no virtual environment: install the package and its extras into the
#                         environment of MLPS_PYTHON (default python3), e.g. an NGC or conda image
#                         on a cluster; a torch that imports there is kept as it is (pip may not
#                         replace it), else the chosen build is installed
#   MLPS_PYTHON=python3   without MLPS_VENV=none: use that interpreter with its packages as they
#                         are, no venv, nothing installed (an offline GPU node's image)
#   MLPS_TORCH_INDEX=URL  the package index for that build (default: the configured indexes for
#                         cu130 and for cpu when a +cpu wheel is among pip's find-links,
#                         https://download.pytorch.org/whl/BUILD otherwise)
#   MLPS_DALI=FLAVOUR     auto (default: cuda12 for cu12x builds, else cuda13, whose wheel also runs
#                         the CPU pipelines of the test suite) | cuda12 | cuda13 | none
#   MLPS_TORCH_PIN        the torch requirement (default torch==2.13.0)
#
# Extras installed: train, deepspeed, slides, export, test and dali-<flavour> (pyproject.toml).
# A fresh CPU venv measures 1.9G (du -sh); torch (0.75 GB) and DALI (0.6 GB) are most of it.

_mlps_shims() {  # `python` and `torchrun` on PATH run interpreter $1 (wrappers: it keeps its own path)
    local shim
    shim="${TMPDIR:-/tmp}/mlps-python-$(id -u)-$(printf '%s' "$1" | sha256sum | cut -c1-8)"
    mkdir -p "$shim" || return 1
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$1" >"$shim/python" &&
        printf '#!/bin/sh\nexec "%s" -m torch.distributed.run "$@"\n' "$1" >"$shim/torchrun" &&
        chmod +x "$shim/python" "$shim/torchrun" || return 1
    export PATH="$shim:$PATH"
}

_mlps_requirements() {  # $1 pyproject.toml, $2 extras (a,b,c): their requirements less torch, one a line
    "$py" - "$1" "$2" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10: pip carries tomli
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras, seen, printed = project["optional-dependencies"], set(), []
def expand(names):
    for name in names:
        if name not in seen:
            seen.add(name)
            for req in extras[name]:
                dist = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
                if dist == "mlps-dist":  # an extra made of other extras
                    expand(re.search(r"\[(.*)\]", req).group(1).split(","))
                elif dist != "torch" and req not in printed:
                    printed.append(req)
                    print(req)
expand(sys.argv[2].split(","))
EOF
}

_mlps_venv() {
    local repo venv torch_pin build why dali index driver version extras want stamp links link found=""
    local dry="" system="" py="" torch_have="" constraint="" check arg
    local -a pip_cmd reqs
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run as a command: read the flags
        for arg in "$@"; do
            case "$arg" in
                --dry-run) dry=1 ;;
                --system) system=1 ;;
                *) echo "[venv] $arg: tools/venv.sh takes --dry-run and --system" >&2; return 2 ;;
            esac
        done
    fi
    [[ "${MLPS_VENV:-}" == none ]] && system=1
    if [[ -n "${MLPS_PYTHON:-}" || -n "$system" ]]; then
        py="$(command -v "${MLPS_PYTHON:-python3}")" || {
            echo "[venv] MLPS_PYTHON=${MLPS_PYTHON:-python3}: no such interpreter" >&2; return 2; }
    fi
    if [[ -n "${MLPS_PYTHON:-}" && -z "$system" ]]; then
        [[ -n "$dry" ]] && { echo "[venv] MLPS_PYTHON: would use $py and its packages as they are"; return 0; }
        _mlps_shims "$py" || return 1
        echo "[venv] MLPS_PYTHON: using $py and its packages as they are (no venv, nothing installed)" >&2
        return 0
    fi

    # The torch build for this machine.
    torch_pin="${MLPS_TORCH_PIN:-torch==2.13.0}"
    build="${MLPS_TORCH:-auto}"
    case "$build" in auto | cpu | cu12? | cu13?) ;; *)
        echo "[venv] MLPS_TORCH=$build: use auto, cpu, cu126, cu128 or cu130" >&2; return 2 ;;
    esac
    if [[ -n "$system" ]]; then  # an image's own torch (NGC builds are not on any index) stays
        torch_have="$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")' 2>/dev/null)"
    fi
    if [[ -n "$torch_have" ]]; then
        version="${torch_have#* }"
        if [[ "$version" == cpu ]]; then
            build=cpu version="a CPU build"
        else
            build="cu${version//./}" version="built for CUDA $version"  # CUDA 12.8: cu128
        fi
        why="the torch ${torch_have% *} already in the environment of $py, $version; MLPS_VENV=none keeps it"
    elif [[ "$build" == auto ]]; then
        # nvidia-smi prints its failures on stdout: only a version number counts as a driver.
        driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
        [[ "$driver" =~ ^[0-9]+\.[0-9.]+$ ]] || driver=""
        if [[ -z "$driver" ]]; then
            build=cpu why="no NVIDIA driver found by nvidia-smi; MLPS_TORCH forces another"
        elif ((${driver%%.*} >= 580)); then
            build=cu130 why="NVIDIA driver $driver, >= 580: CUDA 13; MLPS_TORCH forces another"
        elif ((${driver%%.*} >= 525)); then
            build=cu126 why="NVIDIA driver $driver, < 580: CUDA 12; MLPS_TORCH forces another"
        else
            build=cpu why="NVIDIA driver $driver is older than 525, the oldest CUDA 12 runs on; MLPS_TORCH forces another"
        fi
    else
        why="MLPS_TORCH=$build"
    fi
    dali="${MLPS_DALI:-auto}"
    [[ "$dali" == auto ]] && { [[ "$build" == cu12? ]] && dali=cuda12 || dali=cuda13; }
    case "$dali" in cuda12 | cuda13 | none) ;; *)
        echo "[venv] MLPS_DALI=$dali: use auto, cuda12, cuda13 or none" >&2; return 2 ;;
    esac
    index="${MLPS_TORCH_INDEX:-}"
    version="${torch_pin#torch==}"
    if [[ -n "$torch_have" ]]; then
        index="" torch_pin=""
    elif [[ -z "$index" && "$build" == cpu ]]; then
        # A CPU machine whose pip finds a +cpu wheel locally (find-links) takes it with the plain
        # pin; elsewhere the plain pin would fetch the multi-GB CUDA wheel from PyPI.
        links="${PIP_FIND_LINKS:-} $("${py:-python3}" -m pip config get global.find-links 2>/dev/null)"
        for link in $links; do
            compgen -G "${link#file://}/torch-$version+cpu-*.whl" >/dev/null && found=1
        done
        [[ -n "$found" ]] || index="https://download.pytorch.org/whl/cpu"
    elif [[ -z "$index" && "$build" != cu130 ]]; then
        index="https://download.pytorch.org/whl/$build"
        [[ "$torch_pin" == torch==* && "$version" != *+* ]] && torch_pin="torch==$version+$build"
    fi
    extras="train,deepspeed,slides,export,test"
    [[ "$dali" != none ]] && extras="$extras,dali-$dali"
    echo "[venv] torch build $build ($why), DALI ${dali/none/not installed}${index:+, index $index}" >&2

    # The pip command and where its stamp lives.
    if [[ -n "$system" ]]; then
        venv="" stamp="${XDG_CACHE_HOME:-$HOME/.cache}/mlps-dist/installed-$(printf '%s %s' "$py" "$repo" | sha256sum | cut -c1-16)"
        if [[ -n "$torch_have" ]]; then
            # The extras' requirements less torch, with the image's torch as a constraint: pip keeps it
            # or fails, it never installs another (an NGC torch's version is a pre-release, 2.6.0a0+...).
            mapfile -t reqs < <(_mlps_requirements "$repo/pyproject.toml" "$extras") && ((${#reqs[@]})) || {
                echo "[venv] could not read the extras $extras from $repo/pyproject.toml" >&2; return 1; }
            constraint="${TMPDIR:-/tmp}/mlps-torch-constraint-$(id -u).txt"
            pip_cmd=("$py" -m pip install --quiet --disable-pip-version-check -c "$constraint" -e "$repo" "${reqs[@]}")
        else
            pip_cmd=("$py" -m pip install --quiet --disable-pip-version-check ${index:+--extra-index-url "$index"}
                     "$torch_pin" -e "$repo[$extras]")
        fi
    else
        # --no-compile: Python writes the bytecode of what it imports when it imports it; compiling
        # every module of torch, DALI and scipy up front adds 0.24 GB (a fresh CPU venv: 1.9G, not 2.1G).
        venv="${MLPS_VENV:-$repo/.venv}" py="$venv/bin/python" stamp="$venv/.mlps-installed"
        pip_cmd=("$py" -m pip install --quiet --disable-pip-version-check --no-compile
                 ${index:+--extra-index-url "$index"} "$torch_pin" -e "$repo[$extras]")
    fi
    if [[ -n "$dry" ]]; then
        [[ -n "$venv" && ! -x "$venv/bin/python" ]] && echo "[venv] would create $venv"
        local shown=() word
        for word in "${pip_cmd[@]}"; do  # quoted where a shell would need it, for copying
            [[ "$word" =~ ^[A-Za-z0-9_./=:+,@-]+$ ]] && shown+=("$word") || shown+=("'$word'")
        done
        echo "[venv] would run: ${shown[*]}"
        [[ -n "$constraint" ]] && echo "[venv] with the constraint torch==${torch_have% *}"
        return 0
    fi

    want="$(sha256sum "$repo/pyproject.toml" | cut -c1-16) $torch_pin"
    [[ "$build/$dali/$index" != cpu/cuda13/ ]] && want="$want $build $dali $index"
    [[ -n "$torch_have" ]] && want="$want kept torch ${torch_have% *}"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        if [[ -n "$venv" && ! -x "$venv/bin/python" ]]; then
            echo "[venv] creating $venv" >&2
            python3 -m venv "$venv" || return 1
        fi
        [[ -n "$constraint" ]] && { echo "torch==${torch_have% *}" >"$constraint" || return 1; }
        echo "[venv] installing the package with [$extras] into ${venv:-the environment of $py}${torch_pin:+ ($torch_pin)} ..." >&2
        "${pip_cmd[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" >&2
        check="import torch, deepspeed, tensorboard, onnx, onnxruntime, openslide, shapely, scipy, pytest"
        [[ "$dali" != none ]] && check="$check, nvidia.dali"
        "$py" -c "$check" >/dev/null 2>&1 || {
            echo "[venv] install failed: see pip output above (MLPS_TORCH / MLPS_TORCH_INDEX choose the torch build; MLPS_PYTHON uses an existing environment)" >&2
            return 1
        }
        mkdir -p "$(dirname "$stamp")" && echo "$want" >"$stamp"
    fi
    if [[ -n "$venv" ]]; then
        export PATH="$venv/bin:$PATH"
        export VIRTUAL_ENV="$venv"
    else
        _mlps_shims "$py" || return 1
    fi
}
_mlps_venv "$@" || { _mlps_rc=$?; unset -f _mlps_venv _mlps_shims _mlps_requirements; return $_mlps_rc 2>/dev/null || exit $_mlps_rc; }
unset -f _mlps_venv _mlps_shims _mlps_requirements
