"""The GPU check: every CUDA path in one command that always reports (run it as
``bash tools/gpu_check.sh``, which picks the interpreter; this file imports no torch itself).

Prints the environment first (GPU, driver, torch, CUDA, cuDNN, NCCL, DeepSpeed, DALI and the
other optional packages, or "absent"), then runs each check in a process of its own with its
own time-out, and ends with one summary line per check and the log folder:

    PASS  amp        5 passed (78.1 s)  | ddp bf16: weights 1.9% from fp32 ...
    SKIP  dali       nvidia.dali not installed
    FAIL  masks      ran out of its 120 s (log: /tmp/gpu_check.x/masks.log)

A missing optional package is a SKIP with the reason, never a FAIL; a check that fails or runs
out of time does not stop the others. The whole run ends within GPU_CHECK_SECONDS (default
450 s, --quick 220 s): a check that no longer fits is skipped with that reason. Exit status:
0 nothing failed, 1 a check failed or ran out of time, 2 no CUDA device (every check skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import gpu_check_env  # noqa: E402
from mlps_dist.core.proctree import descendants  # noqa: E402  (standard library only: no torch needed)

KILL_GRACE_S = 5


@dataclass(frozen=True)
class Check:
    name: str
    what: str
    timeout: int  # seconds
    quick: bool  # in the --quick half
    tests: str = ""  # pytest -k expression over tests/system/test_gpu.py
    quick_tests: str = ""  # the -k expression with --quick (default: tests)
    command: tuple = ()  # or a command; "{py}" is this interpreter
    requires: tuple = ()  # modules: absent -> SKIP
    default: bool = True  # False: only with --with-demo


TEST_NEEDS = ("pytest", "numpy", "yaml", "PIL")
CHECKS = (
    Check(
        "amp",
        "bf16/fp16 through the stage-1 task (DDP, DeepSpeed) and the fp32 loss",
        180,
        True,
        tests="amp_trains or autocast_reaches or deepspeed_bf16",
        quick_tests="amp_trains or deepspeed_bf16",
        requires=TEST_NEEDS,
    ),
    Check(
        "nccl-ddp",
        "NCCL DDP step = single-process gradient (1 GPU; 2 GPUs where present)",
        90,
        True,
        tests="nccl_ddp_gradient",
        requires=TEST_NEEDS,
    ),
    Check("masks", "mask pass on the GPU vs the CPU, TF32 off", 120, True, tests="mask_pass", requires=TEST_NEEDS),
    Check(
        "train-224",
        "classifier + segmenter at 224 px (ResNet-38d, DeepLab-v3+ R101), bf16",
        200,
        True,
        command=(
            "{py}",
            "tools/bench_train.py",
            "--stages",
            "classifier,segmenter",
            "--sizes",
            "paper",
            "--worlds",
            "1",
            "--parallel",
            "none",
            "--paper-parallel",
            "{zero}",
            "--loaders",
            "torch",
            "--size",
            "224",
            "--paper-micro",
            "8",
            "--paper-steps",
            "{steps}",
            "--warmup",
            "1",
            "--precision",
            "bf16",
            "--threads",
            "4",
            "--workers",
            "4",
            "--timeout",
            "150",
        ),
        requires=("numpy", "yaml", "PIL"),
    ),
    Check(
        "dali",
        "DALI mixed decoding with every augmentation vs the torch loader",
        150,
        True,
        tests="dali",
        quick_tests="dali_mixed and (png-train or jpeg-train or png-masks)",
        requires=(*TEST_NEEDS, "nvidia.dali"),
    ),
    Check(
        "deepspeed",
        "DeepSpeed ZeRO-1 vs DDP over NCCL (ZeRO-2 on 2 GPUs where present)",
        150,
        False,
        tests="nccl_ddp_and_deepspeed",
        requires=(*TEST_NEEDS, "deepspeed"),
    ),
    Check(
        "resume",
        "killed + resumed on the GPU vs uninterrupted, within tolerance",
        150,
        False,
        tests="resume_on_gpu",
        requires=TEST_NEEDS,
    ),
    Check(
        "syncbn",
        "frozen SyncBatchNorm (1 GPU; ranks equal on 2 GPUs)",
        120,
        False,
        tests="sync_batchnorm",
        requires=TEST_NEEDS,
    ),
    Check(
        "speed",
        "cudnn.benchmark / channels_last step times, 224 px, bf16",
        150,
        False,
        command=("{py}", "tools/gpu_speed_probe.py"),
        requires=("numpy", "yaml"),
    ),
    Check(
        "demo",
        "the demo pipeline on one GPU (3-5 min)",
        420,
        False,
        tests="demo_pipeline",
        requires=TEST_NEEDS,
        default=False,
    ),
)


@dataclass
class Result:
    word: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float = 0.0


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to the check and everything below it, SIGKILL to what is left after the grace."""
    victims = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(KILL_GRACE_S)
            victims = [pid for pid in victims if Path(f"/proc/{pid}").exists()]
            if not victims:
                return
        except subprocess.TimeoutExpired:
            pass


def pytest_summary(xml_path: Path) -> tuple[str, str]:
    """(word, detail) from a junit report: counts, skip reasons, first failure, printed figures."""
    counts, skips, failures, figures = {"passed": 0, "failed": 0, "skipped": 0}, [], [], []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        kind = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if kind is None:
            counts["passed"] += 1
        elif kind.tag == "skipped":
            counts["skipped"] += 1
            skips.append((kind.get("message") or "").replace("Skipped: ", ""))
        else:
            counts["failed"] += 1
            message = (kind.get("message") or kind.tag).splitlines() or [kind.tag]
            failures.append(f"{case.get('name')}: {message[0][:160]}")
        out = case.find("system-out")
        lines = (out.text or "").splitlines() if out is not None else []
        figures += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("---")]
    word = "FAIL" if counts["failed"] else ("SKIP" if not counts["passed"] else "PASS")
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if failures:
        text += " | " + "; ".join(failures[:2])
    if skips:
        text += " | skipped: " + "; ".join(sorted(set(skips)))[:240]
    if figures:
        text += " | " + "; ".join(figures)
    return word, text


def bench_summary(log: Path) -> tuple[str, str]:
    """(word, detail) from the JSON line a benchmark script printed into ``log``."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"bench"')]
    if not lines:
        return "FAIL", "no result line"
    record = json.loads(lines[-1])
    runs = record.get("figures", {}).get("runs", {})
    if record["bench"] == "gpu_speed":
        text = "; ".join(
            f"{name}: {', '.join(f'{k} {v} ms' for k, v in steps.items())}" for name, steps in runs.items()
        )
        return "PASS", text
    parts = [
        f"{name}: {r['images_per_s_total']} img/s, step {r['step_s']} s, data wait {r['data_wait']:.1%}, "
        f"peak {'/'.join(str(m) for m in r['peak_mem_mib_per_rank'])} MiB per rank"
        for name, r in runs.items()
    ]
    failed = record.get("figures", {}).get("failed", {})
    parts += [f"{name} FAILED: {why[:160]}" for name, why in failed.items()]
    return ("FAIL" if failed or not runs else "PASS"), "; ".join(parts)


def progress(log: Path) -> str:
    """What a killed pytest run had finished, from its -v lines (", after 2 passed, 1 skipped")."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    done = {word.lower(): text.count(f" {word}") for word in ("PASSED", "FAILED", "SKIPPED") if f" {word}" in text}
    return ", after " + ", ".join(f"{n} {k}" for k, n in done.items()) if done else ""


def command_of(check: Check, args, env: dict) -> list[str]:
    if check.tests:
        tests = check.quick_tests if args.quick and check.quick_tests else check.tests
        return [
            sys.executable,
            "-m",
            "pytest",
            "tests/system/test_gpu.py",
            "-k",
            tests,
            "-v",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_logging=system-out",
            "--junitxml",
            str(args.log_dir / f"{check.name}.xml"),
        ]
    fill = {
        "{py}": sys.executable,
        "{zero}": "zero2" if env["packages"].get("deepspeed") and not args.quick else "none",
        "{steps}": "3" if args.quick else "5",
    }
    return [fill.get(part, part) for part in check.command]


def run_check(check: Check, args, env: dict, deadline: float) -> Result:
    missing = [m for m in check.requires if not env["packages"].get(m)]
    if missing:
        return Result("SKIP", f"{', '.join(missing)} not installed in this environment")
    left = deadline - time.monotonic()
    limit = min(check.timeout, left)
    if left < min(20, check.timeout):
        return Result("SKIP", f"no time left in the {args.budget} s budget (GPU_CHECK_SECONDS)")
    log = args.log_dir / f"{check.name}.log"
    child_env = {**os.environ, "PYTHONPATH": str(REPO), "MLPS_TEST_GPU": "1"}
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command_of(check, args, env),
            cwd=REPO,
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            return Result("FAIL", f"ran out of its {limit:.0f} s{progress(log)} (log: {log})", time.monotonic() - start)
    seconds = time.monotonic() - start
    xml = args.log_dir / f"{check.name}.xml"
    try:
        word, detail = pytest_summary(xml) if check.tests else bench_summary(log)
    except (OSError, ET.ParseError, json.JSONDecodeError, KeyError) as exc:
        word, detail = "FAIL", f"no readable report ({type(exc).__name__})"
    if rc not in (0, 1) or (rc == 1 and word != "FAIL"):
        word, detail = "FAIL", f"exit status {rc}: {detail} (log: {log})"
    return Result(word, detail, seconds)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GPU check: environment, CUDA-path checks, one summary line each.")
    p.add_argument("--quick", action="store_true", help="the most informative half, under 4 minutes")
    p.add_argument("--with-demo", action="store_true", help="also the demo pipeline (3-5 min more)")
    p.add_argument("--only", default="", help="comma list of check names")
    p.add_argument("--log-dir", default="", help="where the logs go (default: a new temporary folder)")
    p.add_argument("--env-only", action="store_true", help="print the environment lines only")
    args = p.parse_args(argv)
    args.budget = int(os.environ.get("GPU_CHECK_SECONDS") or (220 if args.quick else 450))
    args.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="gpu_check."))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    env = gpu_check_env.probe(timeout=60)
    print("\n".join(gpu_check_env.describe(env)) + f"\n  log folder {args.log_dir}", flush=True)
    if args.env_only:
        return 0
    chosen = [c for c in CHECKS if not args.only or c.name in args.only.split(",")]
    results = {}
    for check in chosen:
        if not env.get("cuda_devices"):
            results[check.name] = Result("SKIP", "no CUDA device")
        elif args.quick and not check.quick:
            results[check.name] = Result("SKIP", "not in --quick (the full check runs it)")
        elif not check.default and not args.with_demo:
            results[check.name] = Result("SKIP", "not in the 8-minute set (--with-demo runs it)")
        else:
            print(f"[gpu_check] {check.name}: {check.what} ...", flush=True)
            results[check.name] = run_check(check, args, env, deadline)
    print("\ngpu_check summary")
    if not env.get("cuda_devices"):
        print(
            f"FAIL  setup      torch sees no CUDA device ({env.get('torch_error') or 'torch ' + str(env.get('torch'))}): "  # noqa: E501
            "run this on a GPU node (the CPU suite is bash tools/test.sh)"
        )
    for name, r in results.items():
        timing = f" ({r.seconds:.1f} s)" if r.seconds else ""
        print(f"{r.word:5} {name:10} {r.detail}{timing}")
    failed = [n for n, r in results.items() if r.word == "FAIL"]
    status = 2 if not env.get("cuda_devices") else (1 if failed else 0)
    verdict = {0: "nothing failed", 1: f"FAILED: {', '.join(failed)}", 2: "no CUDA device: nothing checked"}[status]
    print(f"gpu_check: {verdict}; {time.monotonic() - start:.0f} s; logs in {args.log_dir}; exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
