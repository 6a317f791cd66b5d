"""tools/venv.sh's choices, without installing anything. `bash tools/venv.sh --dry-run` prints the
torch build it chooses, why, and the pip command; a stand-in nvidia-smi plays the driver. Where the
script is sourced for real, a stand-in python records the pip command it is given instead of
running it. The CPU machine's plain pin (a +cpu wheel among pip's find-links) stays exactly the
command it always was."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries tomli
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
EXTRAS = "train,deepspeed,slides,export,test"


def _env(tmp_path: Path, driver: str | None = None, **env) -> dict[str, str]:
    """The caller's environment less MLPS_*, with a stand-in nvidia-smi printing ``driver``
    (``"fail"``: the message and status of an nvidia-smi that finds no driver)."""
    path = os.environ["PATH"]
    if driver is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(parents=True)
        body = (
            'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9'
            if driver == "fail"
            else f"echo {driver}"
        )
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        path = f"{bin_dir}:{path}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLPS_")}
    return {**base, "PATH": path, "MLPS_VENV": str(tmp_path / "venv"), **env}


def _dry_run(tmp_path: Path, *flags: str, driver: str | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "tools/venv.sh", "--dry-run", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path, driver, **env),
    )


def _pip_words(done: subprocess.CompletedProcess) -> list[str]:
    line = next(line for line in done.stdout.splitlines() if line.startswith("[venv] would run: "))
    return shlex.split(line.removeprefix("[venv] would run: "))


def _requirements(*extras: str) -> list[str]:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [req for extra in extras for req in table[extra]]


@pytest.mark.parametrize(
    "driver, build, dali, why",
    [
        ("580.65.06", "cu130", "cuda13", "NVIDIA driver 580.65.06, >= 580: CUDA 13"),
        ("575.51.03", "cu126", "cuda12", "NVIDIA driver 575.51.03, < 580: CUDA 12"),
        ("470.256.02", "cpu", "cuda13", "NVIDIA driver 470.256.02 is older than 525"),
        ("fail", "cpu", "cuda13", "no NVIDIA driver found by nvidia-smi"),
    ],
)
def test_the_driver_chooses_the_torch_build_and_the_dali_extra(tmp_path, driver, build, dali, why):
    done = _dry_run(tmp_path, driver=driver, PIP_FIND_LINKS="/nonexistent", PIP_CONFIG_FILE="/dev/null")
    assert done.returncode == 0, done.stderr
    assert f"[venv] torch build {build} ({why}" in done.stderr
    pip = _pip_words(done)
    assert pip[-1] == f"{REPO}[{EXTRAS},dali-{dali}]" and pip[-2] == "-e"
    if build == "cu130":  # PyPI's default torch wheel is the CUDA 13 build
        assert "--extra-index-url" not in pip and pip[-3] == "torch==2.13.0"
    else:
        index = "cpu" if build == "cpu" else build
        assert pip[pip.index("--extra-index-url") + 1] == f"https://download.pytorch.org/whl/{index}"
        assert pip[-3] == ("torch==2.13.0" if build == "cpu" else f"torch==2.13.0+{build}")
    assert f"would create {tmp_path / 'venv'}" in done.stdout and not (tmp_path / "venv").exists()


def test_forced_choices_and_bad_values(tmp_path):
    done = _dry_run(tmp_path, driver="580.65.06", MLPS_TORCH="cu128", MLPS_DALI="none")
    assert "[venv] torch build cu128 (MLPS_TORCH=cu128), DALI not installed" in done.stderr
    assert _pip_words(done)[-3:] == ["torch==2.13.0+cu128", "-e", f"{REPO}[{EXTRAS}]"]
    for key, value, message in [
        ("MLPS_TORCH", "rocm", "MLPS_TORCH=rocm: use auto, cpu, cu126, cu128 or cu130"),
        ("MLPS_DALI", "cuda11", "MLPS_DALI=cuda11: use auto, cuda12, cuda13 or none"),
    ]:
        bad = _dry_run(tmp_path, **{key: value})
        assert bad.returncode == 2 and message in bad.stderr and "would run" not in bad.stdout
    flag = subprocess.run(
        ["bash", "tools/venv.sh", "--sytem"], cwd=REPO, capture_output=True, text=True, env=_env(tmp_path)
    )
    assert flag.returncode == 2 and "--sytem: tools/venv.sh takes --dry-run and --system" in flag.stderr


NGC_TORCH = "2.6.0a0+ecf3bae40a.nv25.01"  # an NGC image's torch: a pre-release no index offers
IMAGE_MODULES = ("deepspeed", "tensorboard", "onnx", "onnxruntime", "openslide", "shapely", "scipy", "pytest")


def _image_python(tmp_path: Path, torch: bool = True) -> Path:
    """A python3 standing for an NGC image's: the packages the install check imports are empty
    modules (torch: NGC_TORCH built for CUDA 12.8, or one that fails to import), ``-m pip install``
    is recorded in pip.log; everything else runs with this interpreter."""
    image = tmp_path / "image"
    (image / "nvidia" / "dali").mkdir(parents=True)
    for name in ("nvidia/__init__", "nvidia/dali/__init__", *IMAGE_MODULES):
        (image / f"{name}.py").write_text("")
    if torch:
        (image / "torch.py").write_text(f"__version__ = {NGC_TORCH!r}\nclass version:\n    cuda = '12.8'\n")
    else:
        (image / "torch.py").write_text("raise ImportError('no torch in this image')\n")
    python = tmp_path / "image-bin" / "python3"
    python.parent.mkdir()
    python.write_text(f"""#!/bin/bash
if [[ "$1 $2 $3" == "-m pip install" ]]; then echo "PIP $*" >> "{tmp_path}/pip.log"; exit 0; fi
PYTHONPATH="{image}" exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return python


def test_an_existing_environment_keeps_its_torch(tmp_path):
    """--system (MLPS_VENV=none) with a torch that imports: no venv, no torch requirement, the
    installed torch as a constraint, every other requirement of the extras; the DALI extra
    follows the CUDA that torch was built for."""
    python = _image_python(tmp_path)
    done = _dry_run(tmp_path, "--system", driver="580.65.06", MLPS_PYTHON=str(python))
    assert done.returncode == 0, done.stderr
    assert (
        f"[venv] torch build cu128 (the torch {NGC_TORCH} already in the environment of {python}, built for "
        "CUDA 12.8; MLPS_VENV=none keeps it), DALI cuda12"
    ) in done.stderr
    pip = _pip_words(done)
    assert pip[:3] == [str(python), "-m", "pip"] and pip[pip.index("-e") + 1] == str(REPO)
    wanted = _requirements(*EXTRAS.split(","), "dali-cuda12")
    assert set(pip[pip.index("-e") + 2 :]) == {r for r in wanted if not r.startswith("torch")}
    assert f"[venv] with the constraint torch=={NGC_TORCH}" in done.stdout
    assert "would create" not in done.stdout and not (tmp_path / "pip.log").exists()


def test_an_existing_environment_without_torch_gets_the_chosen_build(tmp_path):
    python = _image_python(tmp_path, torch=False)
    done = _dry_run(tmp_path, driver="575.51.03", MLPS_VENV="none", MLPS_PYTHON=str(python))
    assert "[venv] torch build cu126 (NVIDIA driver 575.51.03" in done.stderr
    assert _pip_words(done)[:2] == [str(python), "-m"]
    assert _pip_words(done)[-3:] == ["torch==2.13.0+cu126", "-e", f"{REPO}[{EXTRAS},dali-cuda12]"]


def _source(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    script = 'set -u; source tools/venv.sh; echo "rc=$? opts=$- python=$(command -v python)"'
    return subprocess.run(
        ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, env=_env(tmp_path, **env)
    )


def _pip(tmp_path: Path) -> str:
    log = tmp_path / "pip.log"
    return log.read_text() if log.is_file() else ""


def test_this_cpu_machine_keeps_the_plain_pin(tmp_path):
    if not any(Path(d).glob("torch-2.13.0+cpu-*.whl") for d in os.environ.get("PIP_FIND_LINKS", "").split()):
        pytest.skip("no +cpu torch wheel among PIP_FIND_LINKS on this machine")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(_image_python(tmp_path))
    done = _source(tmp_path)
    assert "rc=0" in done.stdout and "e" not in done.stdout.split("opts=")[1].split()[0], done.stdout
    assert _pip(tmp_path).split() == [
        "PIP",
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "torch==2.13.0",
        "-e",
        f"{REPO}[{EXTRAS},dali-cuda13]",
    ]
    assert "torch build cpu (no NVIDIA driver found" in done.stderr
    assert (venv / ".mlps-installed").read_text().split()[1:] == ["torch==2.13.0"]
    assert done.stdout.split("python=")[1].split()[0] == str(venv / "bin" / "python")


def test_an_existing_environment_is_installed_into_once(tmp_path):
    """Sourced with MLPS_VENV=none: one pip command with the torch constraint, a stamp outside the
    repository, `python` on PATH runs that interpreter; sourced again, nothing is installed."""
    python = _image_python(tmp_path)
    env = {
        "MLPS_VENV": "none",
        "MLPS_PYTHON": str(python),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path),
    }
    done = _source(tmp_path, **env)
    assert "rc=0" in done.stdout, done.stderr
    pip = _pip(tmp_path).split()
    assert Path(pip[pip.index("-c") + 1]).read_text().split() == [f"torch=={NGC_TORCH}"]
    assert pip[pip.index("-e") + 1] == str(REPO) and not any(w.startswith("torch") for w in pip)
    assert len(list((tmp_path / "cache" / "mlps-dist").iterdir())) == 1 and not (tmp_path / "venv").exists()
    shim = Path(done.stdout.split("python=")[1].split()[0])
    ran = subprocess.run([str(shim), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    assert ran.stdout.strip() == NGC_TORCH
    again = _source(tmp_path, **env)
    assert "rc=0" in again.stdout and _pip(tmp_path).count("PIP ") == 1


def test_mlps_python_uses_that_interpreter_and_installs_nothing(tmp_path):
    done = _source(tmp_path, MLPS_PYTHON=sys.executable, TMPDIR=str(tmp_path))
    assert "rc=0" in done.stdout and "nothing installed" in done.stderr and _pip(tmp_path) == ""
    shim = Path(done.stdout.split("python=")[1].split()[0])
    ran = subprocess.run([str(shim), "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
    assert ran.stdout.strip() == sys.executable  # the venv's own python, so its packages come along
    assert (shim.parent / "torchrun").is_file()
