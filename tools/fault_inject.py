"""Crash the pipeline at random moments and check that the result does not change.

    python tools/fault_inject.py --config configs/demo.yaml --out runs/faults --kills 5 [key=value ...]

1. Runs ``launch/pipeline.sh`` uninterrupted into OUT/reference (skipped when it is
   already finished there) and times it.
2. Runs it into OUT/faulted and, at N random moments spread over the reference's
   duration, freezes and SIGKILLs the launcher, torchrun and every worker at once (the
   whole process tree, like a node crash: no handler runs, nothing is flushed), then
   starts the same command again; after the last kill it runs to the end.
3. Compares the two run directories: every weight of classifier/{model,best}.pt and
   segmenter/{model,best}.pt, the pseudo-mask chunks byte for byte, and the test (and
   val) metrics. Writes OUT/report.json; exit status 0 when everything is identical.

Environment as for launch/pipeline.sh (NPROC_PER_NODE, ...).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlps_dist.core.fileio import atomic_write_json  # noqa: E402

# ---------------------------------------------------------------- process trees


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running_stage(pid: int) -> str:
    for child in descendants(pid):
        try:
            words = (Path("/proc") / str(child) / "cmdline").read_text().split("\0")
        except OSError:
            continue
        for word in words:
            if word.startswith("mlps_dist.") and word != "mlps_dist.run.artifacts":
                return word.split(".", 1)[1]
    return "launcher"


def crash(pid: int) -> int:
    """SIGSTOP the whole tree until no new process appears, then SIGKILL all of it at once."""
    frozen: set[int] = set()
    while True:
        tree = {pid, *descendants(pid)} - frozen
        if not tree:
            break
        for p in tree:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= tree
    for p in frozen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(frozen)


# ---------------------------------------------------------------- runs


def start(config: str, run_dir: Path, overrides: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REPO / "launch" / "pipeline.sh"), config, str(run_dir), *overrides],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_to_end(config: str, run_dir: Path, overrides: list[str], log) -> int:
    return start(config, run_dir, overrides, log).wait()


def faulted_run(
    config: str, run_dir: Path, overrides: list[str], kills: int, span: float, rng: random.Random, min_gap: float, log
) -> list[dict]:
    """Kill the pipeline ``kills`` times at random moments; then let it finish."""
    moments = sorted(rng.uniform(0, span) for _ in range(kills))
    record, previous = [], 0.0
    for moment in moments:
        delay = max(moment - previous, min_gap)
        previous = moment
        proc = start(config, run_dir, overrides, log)
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            record.append({"after_s": round(delay, 2), "killed": False, "status": proc.returncode})
            if proc.returncode == 0:
                break  # finished before the moment came: nothing left to crash
            continue
        stage = running_stage(proc.pid)
        count = crash(proc.pid)
        proc.wait()
        record.append({"after_s": round(delay, 2), "killed": True, "stage": stage, "processes": count})
        print(f"kill {len(record)}: after {delay:.1f} s in {stage} ({count} processes)", flush=True)
    status = run_to_end(config, run_dir, overrides, log)
    if status != 0:
        raise SystemExit(f"the faulted run did not finish after its last kill (status {status}); see the log")
    return record


# ---------------------------------------------------------------- comparison


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _without_file_ids(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in ("segmenter", "segmenter_digest")}
    if isinstance(out.get("classifier"), dict):  # the gate's stage-1 file: its digest holds the run dir too
        out["classifier"] = {k: v for k, v in out["classifier"].items() if k != "digest"}
    return out


def compare(reference: Path, faulted: Path) -> dict[str, bool]:
    import torch

    from mlps_dist.core import layout
    from mlps_dist.train.checkpoint import load_model_file

    same: dict[str, bool] = {}  # keyed by the path relative to the run ("classifier/model.pt")
    for stage in layout.TRAINED:
        for which in ("model", "best"):
            a, b = layout.model_file(reference, stage, which), layout.model_file(faulted, stage, which)
            name = layout.relative(reference, a)
            if not a.exists() and not b.exists():
                continue
            if a.exists() != b.exists():
                same[name] = False
                continue
            sa, sb = load_model_file(a)[0], load_model_file(b)[0]
            same[name] = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    masks_a = sorted(layout.masks_dir(reference).glob("masks-*.tar"))
    masks_b = sorted(layout.masks_dir(faulted).glob("masks-*.tar"))
    same["pseudo_masks"] = [p.name for p in masks_a] == [p.name for p in masks_b] and all(
        _sha(a) == _sha(b) for a, b in zip(masks_a, masks_b)
    )
    for path in sorted(layout.stage_dir(reference, "evaluate").glob("*.json")):
        if path.name.endswith(".stamp.json"):
            continue
        other = layout.stage_dir(faulted, "evaluate") / path.name
        name = layout.relative(reference, path)
        if not other.exists():
            same[name] = False
            continue
        # The model files' paths and byte digests name the run dir (their meta holds the
        # config); the weights themselves are compared above.
        same[name] = _without_file_ids(json.loads(path.read_text())) == _without_file_ids(json.loads(other.read_text()))
    return same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="folder for reference/, faulted/, the logs and report.json")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--min-gap", type=float, default=2.0, help="least seconds a restarted pipeline runs before a kill")
    p.add_argument("overrides", nargs="*", help="key=value for every stage")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference, faulted = out / "reference", out / "faulted"
    with open(out / "reference.log", "a") as log:
        began = time.monotonic()
        if run_to_end(args.config, reference, args.overrides, log) != 0:
            raise SystemExit(f"the reference run failed; see {out / 'reference.log'}")
        span = time.monotonic() - began
    timing = (
        json.loads((out / "report.json").read_text()).get("reference_s", span)
        if (out / "report.json").exists()
        else span
    )
    span = max(span, timing)  # a reference finished earlier took no time now: use its recorded duration
    with open(out / "faulted.log", "a") as log:
        kills = faulted_run(
            args.config, faulted, args.overrides, args.kills, span, random.Random(args.seed), args.min_gap, log
        )
    same = compare(reference, faulted)
    report = {
        "reference_s": round(span, 1),
        "kills": kills,
        "killed": sum(k["killed"] for k in kills),
        "identical": all(same.values()),
        "compared": same,
    }
    atomic_write_json(out / "report.json", report, indent=1)
    print(json.dumps(report, indent=1))
    print(f"{report['killed']} kills at random moments, results {'identical' if report['identical'] else 'DIFFERENT'}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
