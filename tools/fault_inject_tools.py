"""Kill a tool (make_shards, tile_slides, segment_slides, infer) at random moments and check
that its rerun writes exactly what an uninterrupted run writes.

    python tools/fault_inject_tools.py --out runs/tool_faults --kills 3 -- \
        python -m mlps_dist shards --layout luad --src data/demo/raw --out {out}

``{out}`` in the command is replaced by the output folder. The tool is run uninterrupted
into OUT/reference (timed), then into OUT/faulted: at ``--kills`` random moments spread over
the reference's duration (``--seed``) the whole process group is SIGKILLed (no handler runs,
nothing is flushed) and the same command is started again; after the last kill it runs to
the end. Every file of the two folders is compared byte for byte (the lock, the marker and
the tool's ledger aside). Prints one JSON line; exit status 0 when they are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

SKIP = (".lock", ".mlps-output", ".mlps-written.json")


def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` but the bookkeeping files."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(SKIP):
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def start(command: list[str], out: Path) -> subprocess.Popen:
    argv = [a.replace("{out}", str(out)) for a in command]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_to_end(command: list[str], out: Path, timeout: float) -> tuple[int, str]:
    proc = start(command, out)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def kill_at(command: list[str], out: Path, delay: float) -> bool:
    """Start the command and SIGKILL its process group after ``delay`` s; False when it had
    already finished by then (nothing was killed)."""
    proc = start(command, out)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def inject(command: list[str], out: Path, kills: int, seed: int, timeout: float) -> dict:
    reference, faulted = out / "reference", out / "faulted"
    started = time.perf_counter()
    status, output = run_to_end(command, reference, timeout)
    duration = time.perf_counter() - started
    if status != 0:
        return {"ok": False, "error": f"the uninterrupted run exited {status}: {output[-2000:]}"}
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0.05, 0.95) * duration for _ in range(kills))
    killed = [round(m, 2) for m in moments if kill_at(command, faulted, m)]
    status, output = run_to_end(command, faulted, timeout)
    if status != 0:
        return {"ok": False, "killed_at_s": killed, "error": f"the rerun exited {status}: {output[-2000:]}"}
    a, b = tree(reference), tree(faulted)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return {
        "ok": not differ,
        "reference_s": round(duration, 2),
        "killed_at_s": killed,
        "files": len(a),
        "differ": differ[:20],
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: fault_inject_tools.py --out DIR [--kills N] [--seed S] -- COMMAND ... {out} ...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for reference/ and faulted/")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if not command or not any("{out}" in a for a in command) or args.kills < 0:
        print("error: give a command holding {out} after --, and --kills >= 0", file=sys.stderr)
        return 2
    report = inject(command, Path(args.out), args.kills, args.seed, args.timeout)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
