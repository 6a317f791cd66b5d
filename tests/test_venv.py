"""tools/venv.sh's choices, without installing anything: a stand-in venv python records the
pip command it is given, a stand-in nvidia-smi plays the driver. The CPU machine's plain pin
(a +cpu wheel among pip's find-links) stays exactly the command it always was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _stub_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"""#!/bin/bash
if [[ "$1 $2 $3" == "-m pip config" ]]; then exec {sys.executable} "$@"; fi
if [[ "$1 $2" == "-m pip" ]]; then echo "PIP $*" >> "{tmp_path}/pip.log"; exit 0; fi
exit 0
""")
    python.chmod(0o755)
    return venv


def _source(tmp_path: Path, driver: str | None = None, **env) -> subprocess.CompletedProcess:
    venv = _stub_venv(tmp_path)
    path = os.environ["PATH"]
    if driver is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        path = f"{bin_dir}:{path}"
    script = 'set -u; source tools/venv.sh; echo "rc=$? opts=$- python=$(command -v python)"'
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLPS_")}
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**base, "PATH": path, "MLPS_VENV": str(venv), **env})


def _pip(tmp_path: Path) -> str:
    log = tmp_path / "pip.log"
    return log.read_text() if log.is_file() else ""


def test_this_cpu_machine_keeps_the_plain_pin(tmp_path):
    if not any(Path(d).glob("torch-2.13.0+cpu-*.whl") for d in os.environ.get("PIP_FIND_LINKS", "").split()):
        pytest.skip("no +cpu torch wheel among PIP_FIND_LINKS on this machine")
    done = _source(tmp_path)
    assert "rc=0" in done.stdout and "e" not in done.stdout.split("opts=")[1].split()[0], done.stdout
    assert _pip(tmp_path).split() == ["PIP", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                      "torch==2.13.0", "-e", f"{REPO}[test,export,dali-cuda13]"]
    assert "torch build cpu (no NVIDIA driver found" in done.stderr
    assert (tmp_path / "venv" / ".mlps-installed").read_text().split()[1:] == ["torch==2.13.0"]


def test_a_cpu_machine_without_a_local_cpu_wheel_takes_the_cpu_index(tmp_path):
    done = _source(tmp_path, PIP_FIND_LINKS="/nonexistent", PIP_CONFIG_FILE="/dev/null")
    assert "rc=0" in done.stdout
    assert "--extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0 " in _pip(tmp_path)


@pytest.mark.parametrize("driver, build, dali", [("580.65.06", "cu130", "dali-cuda13"),
                                                 ("575.51.03", "cu126", "dali-cuda12")])
def test_the_driver_chooses_the_cuda_build_and_the_dali_extra(tmp_path, driver, build, dali):
    done = _source(tmp_path, driver=driver)
    pip = _pip(tmp_path)
    assert "rc=0" in done.stdout and f"torch build {build} (NVIDIA driver {driver}" in done.stderr
    assert f"[test,export,{dali}]" in pip
    if build == "cu130":  # PyPI's default torch wheel is the CUDA 13 build
        assert "--extra-index-url" not in pip and " torch==2.13.0 " in pip
    else:
        assert f"--extra-index-url https://download.pytorch.org/whl/{build} torch==2.13.0+{build} " in pip


def test_forced_choices_and_bad_values(tmp_path):
    done = _source(tmp_path, MLPS_TORCH="cu128", MLPS_DALI="none")
    assert "rc=0" in done.stdout and "torch==2.13.0+cu128 -e" in _pip(tmp_path)
    assert f"{REPO}[test,export]" in _pip(tmp_path)
    bad = _source(tmp_path / "bad", MLPS_TORCH="rocm")
    assert "rc=2" in bad.stdout and "MLPS_TORCH=rocm: use auto, cpu, cu126, cu128 or cu130" in bad.stderr


def test_mlps_python_uses_that_interpreter_and_installs_nothing(tmp_path):
    done = _source(tmp_path, MLPS_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    assert "rc=0" in done.stdout and "nothing installed" in done.stderr and _pip(tmp_path) == ""
    shim = Path(done.stdout.split("python=")[1].split()[0])
    ran = subprocess.run([str(shim), "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
    assert ran.stdout.strip() == sys.executable  # the venv's own python, so its packages come along
    assert (shim.parent / "torchrun").is_file()
