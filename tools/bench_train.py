"""Training throughput: images/s per rank and in total, data wait and peak memory, for the
classifier (stage 1) and the segmenter (stage 3), DDP on 1 and 2 ranks, DDP vs. DeepSpeed
ZeRO-1/ZeRO-2, torch vs. DALI loader. Prints one JSON line (see tools/bench_common.py).

    python tools/bench_train.py                                  # CPU default (tools/bench_all.sh)
    python tools/bench_train.py --size 224 --micro 16 --paper-micro 8 --steps 20   # on a GPU node
    python tools/bench_train.py --quick                          # the smallest run (smoke test)

Every configuration is a real ``torchrun --standalone`` job of this file (``--worker``) that
builds the project's own pieces: the stage's task (model factory, loss, real loader over
shards written by mlps shards, with pseudo masks for the segmenter),
``parallel.wrap`` (DDP or a DeepSpeed engine) and ``engine.train_step``. One job per
configuration, so each peak-memory figure belongs to that configuration alone.

Figures per configuration: images/s per rank and total (after ``--warmup`` steps), mean step
time, data wait = time spent in next(loader) / step time, peak memory per rank (max RSS on
CPU, torch.cuda.max_memory_allocated on GPU). Ratios, all against baselines measured in the
same run on the same shards: scaling efficiency total_2 / (2 x total_1) (DDP, torch loader),
ZeRO-k / DDP throughput and memory at the same world size, DALI / torch throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_common  # noqa: E402

SMALL = {"classifier": "small38", "segmenter": "deeplabv3plus_small"}
PAPER = {"classifier": "resnet38d", "segmenter": "deeplabv3plus_resnet101"}


def write_pseudo_masks(root: Path, run_dir: Path, layers=("b4_5", "b5_2", "bn7")) -> None:
    """A complete pseudo-mask store for the train split, as stage 2 leaves it. The masks are
    bands of each patch's labelled classes: their content does not change the training cost."""
    import numpy as np

    from mlps_dist.core import layout, png
    from mlps_dist.data.pseudo_masks import new_manifest, refresh_manifest, write_chunk
    from mlps_dist.data.shards import open_split

    reader = open_split(root, "train")
    size = reader.info["splits"]["train"]["image_size"][0]
    samples = []
    for i in range(len(reader)):
        present = np.flatnonzero(reader.labels(i)) if reader.labels(i).any() else np.array([reader.ignore_index])
        band = present[np.arange(size) * len(present) // size].astype(np.uint8)
        mask = np.broadcast_to(band[None, :], (size, size))
        samples.append((reader.key(i), [png.encode_indices(np.roll(mask, k, axis=1)) for k in range(len(layers))]))
    folder = layout.masks_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_chunk(folder, 0, samples, list(layers))
    settings = {
        "layers": list(layers),
        "chunk_size": len(reader),
        "count": len(reader),
        "classes": list(reader.classes),
    }
    refresh_manifest(folder, new_manifest("train", settings), complete=True)


def prepare_data(args, workdir: Path) -> tuple[Path, Path]:
    """Synthetic shards with enough samples for the largest run, and their pseudo masks."""
    worlds = [int(w) for w in args.worlds.split(",")]
    need = (args.warmup + max(args.steps, args.paper_steps)) * max(args.micro, args.paper_micro) * max(worlds)
    root = bench_common.synthetic_shards(workdir, train=need, size=args.size, image_format=args.image_format)
    run_dir = workdir / "run"
    write_pseudo_masks(root, run_dir)
    return root, run_dir


def plan_runs(args, data: tuple[Path, Path]) -> list[dict]:
    """The configurations: DDP over the worlds (torch loader, then each other loader at the
    largest world), then each ZeRO stage at the largest world: ``--parallel`` for the small
    models, ``--paper-parallel`` for the paper-size ones, which use the first loader only."""
    root, run_dir = data
    worlds = [int(w) for w in args.worlds.split(",")]
    loaders = args.loaders.split(",")
    runs = []
    for size in args.sizes.split(","):
        models = {"small": SMALL, "paper": PAPER}[size]
        micro, steps, warmup, zeros = (
            (args.micro, args.steps, args.warmup, args.parallel)
            if size == "small"
            else (args.paper_micro, args.paper_steps, min(args.warmup, 1), args.paper_parallel)
        )
        combos = [("ddp", w, loaders[0]) for w in worlds]
        combos += [("ddp", worlds[-1], loader) for loader in loaders[1:] if size == "small"]
        combos += [(zero, worlds[-1], loaders[0]) for zero in zeros.split(",") if zero != "none"]
        for stage in args.stages.split(","):
            for parallel, world, loader in combos:
                runs.append(
                    {
                        "name": f"{stage}/{models[stage]}/{parallel}/w{world}/{loader}",
                        "stage": stage,
                        "model": models[stage],
                        "parallel": parallel,
                        "world": world,
                        "loader": loader,
                        "micro": micro,
                        "steps": steps,
                        "warmup": warmup,
                        "threads": args.threads,
                        "precision": args.precision,
                        "workers": args.workers,
                        "root": str(root),
                        "run_dir": str(run_dir),
                        "abort_rank": args.abort_rank,
                    }
                )
    return runs


def summarise(runs: list[dict], results: dict, failures: dict) -> tuple[dict, dict, str]:
    """Per-configuration figures and, per model, the ratios to the baselines of this run."""
    figures = {"runs": {}, "failed": failures}
    for spec in runs:
        ranks = results.get(spec["name"])
        if not ranks:
            continue
        per_rank = [r["images"] / r["seconds"] for r in ranks]
        figures["runs"][spec["name"]] = {
            "world": spec["world"],
            "micro_batch": spec["micro"],
            "steps": spec["steps"],
            "params_m": round(ranks[0]["params_m"], 2),
            "images_per_s_per_rank": [round(v, 2) for v in per_rank],
            "images_per_s_total": round(sum(r["images"] for r in ranks) / max(r["seconds"] for r in ranks), 2),
            "step_s": round(max(r["step_s"] for r in ranks), 4),
            "data_wait": round(sum(r["waited"] / r["seconds"] for r in ranks) / len(ranks), 4),
            "peak_mem_mib_per_rank": [round(r["peak_mib"], 1) for r in ranks],
        }
    done = [spec for spec in runs if spec["name"] in figures["runs"]]
    base_loader = runs[0]["loader"]

    def find(spec, **change):
        want = {k: spec[k] for k in ("stage", "model", "parallel", "world", "loader")} | change
        return next((o for o in done if all(o[k] == v for k, v in want.items())), None)

    def rate(spec):
        return figures["runs"][spec["name"]]["images_per_s_total"]

    def memory(spec):
        return max(figures["runs"][spec["name"]]["peak_mem_mib_per_rank"])

    ratio = {}
    for spec in done:
        group = ratio.setdefault(f"{spec['stage']}/{spec['model']}", {})
        base = find(spec, parallel="ddp", loader=base_loader)  # DDP, same world, baseline loader
        if spec["parallel"] != "ddp" and base:
            group[f"{spec['parallel']}_vs_ddp"] = bench_common.ratio(rate(spec), rate(base))
            group[f"{spec['parallel']}_mem_vs_ddp"] = bench_common.ratio(memory(spec), memory(base))
        elif spec["loader"] != base_loader and base:
            group[f"{spec['loader']}_vs_{base_loader}"] = bench_common.ratio(rate(spec), rate(base))
        elif spec["parallel"] == "ddp" and spec["loader"] == base_loader:
            fewest = min(
                (
                    o
                    for o in done
                    if (o["stage"], o["model"], o["parallel"], o["loader"])
                    == (spec["stage"], spec["model"], "ddp", base_loader)
                ),
                key=lambda o: o["world"],
            )
            if fewest["world"] < spec["world"]:  # total_n / (n/m x total_m): 1.0 = perfect scaling
                group[f"scaling_efficiency_w{spec['world']}"] = bench_common.ratio(
                    rate(spec), spec["world"] / fewest["world"] * rate(fewest)
                )
    baseline = (
        f"measured in this run on the same shards: scaling vs DDP on the fewest ranks; ZeRO-k vs DDP "
        f"and other loaders vs the {runs[0]['loader']} loader at the same world size"
    )
    return figures, ratio, baseline


class TimedBatches:
    """Wraps a batch iterator and adds up the time spent waiting in next()."""

    def __init__(self, batches):
        self.batches, self.waited = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start


def create_task(spec: dict):
    """The stage's own task object: the same model factory, loss and loader as training."""
    from mlps_dist.config import config_from_dict
    from mlps_dist.core import layout
    from mlps_dist.data.shards import open_split

    section = {
        "model": spec["model"],
        "batch_size": spec["micro"] * spec["world"],
        "micro_batch_size": spec["micro"],
        "parallel": "deepspeed" if spec["parallel"].startswith("zero") else "ddp",
        "deepspeed_config": str(REPO / "configs" / "deepspeed" / f"{spec['parallel']}.json"),
        "precision": spec["precision"],
    }
    values = {
        "run_dir": spec["run_dir"],
        "data": {"root": spec["root"], "loader": spec["loader"], "num_workers": spec["workers"]},
        spec["stage"]: section,
    }
    if spec["stage"] == "classifier":
        values["classifier"]["pda"] = {"start_epoch": 0}  # PDA on: the cost of most epochs
    cfg = config_from_dict(values, source="bench_train")
    train, val = open_split(cfg.data.root, "train"), open_split(cfg.data.root, "val")
    if spec["stage"] == "classifier":
        from mlps_dist.stages.train_classifier import ClassifierTask

        return cfg, cfg.classifier, ClassifierTask(cfg, train, val)
    from mlps_dist.data.pseudo_masks import PseudoMaskStore
    from mlps_dist.stages.train_segmenter import SegmenterTask

    store = PseudoMaskStore(layout.masks_dir(cfg.run_dir))
    return cfg, cfg.segmenter, SegmenterTask(cfg, train, val, store)


def measure(spec: dict) -> dict:
    """Train ``warmup + steps`` optimizer steps; time the last ``steps`` on this rank."""
    import torch

    from mlps_dist import dist
    from mlps_dist.data import batching
    from mlps_dist.train import engine, parallel, precision

    cfg, train_cfg, task = create_task(spec)
    device = dist.device()
    precision.check(train_cfg, task.stage, device)  # as the trainers' preflight: fp16 needs CUDA and ddp
    plan = batching.plan_batches(train_cfg, dist.get_world_size(), task.stage)
    engine.seed_everything(cfg.seed)
    model = parallel.wrap(
        task.build_model(), train_cfg, plan=plan, total_steps=spec["warmup"] + spec["steps"], device=device
    )
    task.start_epoch(0, model.module)
    model.train()
    batches = TimedBatches(iter(task.train_loader(0, 0, plan)))
    for _ in range(spec["warmup"]):  # worker start-up, allocator and first-call costs stay out
        engine.train_step(model, task, batches, plan)
    bench_common.reset_peak_memory(device)
    dist.barrier()
    batches.waited, step_times = 0.0, []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        float(engine.train_step(model, task, batches, plan))  # reading the loss waits for the step
        step_times.append(time.perf_counter() - start)
    if hasattr(batches.batches, "close"):
        batches.batches.close()  # stop the loader's workers now rather than at interpreter exit
    seconds = sum(step_times)
    images = spec["steps"] * sum(plan.sizes(dist.get_rank()))
    return {
        "rank": dist.get_rank(),
        "images": images,
        "seconds": seconds,
        "waited": batches.waited,
        "step_s": seconds / len(step_times),
        "peak_mib": bench_common.peak_memory_mib(device),
        "params_m": sum(p.numel() for p in model.module.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
    }


def worker_main(spec_json: str, result_path: str) -> int:
    import torch

    from mlps_dist import dist

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    dist.init("auto", force_group=True)  # DeepSpeed wants a process group even for one rank
    try:
        if spec.get("abort_rank") == dist.get_rank():  # --abort-rank: a worker that dies without a traceback
            print(f"rank {dist.get_rank()}: aborting as asked (--abort-rank)", file=sys.stderr, flush=True)
            os.abort()
        per_rank = dist.all_gather_object(measure(spec))
        if dist.is_main():
            Path(result_path).write_text(json.dumps(per_rank))
        # The DeepSpeed engine and the loader's workers sit in reference cycles: free them while the
        # process group is alive, and let every rank get here before it is destroyed, so that no
        # rank tears its sockets down under a peer still using them (a C++ abort, no traceback).
        import gc

        gc.collect()
        dist.barrier()
        return 0
    finally:
        dist.teardown()


def _launcher_traceback(block: list[str]) -> bool:
    """torchrun's own traceback (ChildFailedError), which names no cause."""
    text = "\n".join(block)
    return "ChildFailedError" in text or "torch/distributed/run.py" in text or "elastic/multiprocessing" in text


_CHATTER = re.compile(r"^[WI]\d{4} |\[WARNING\]|FutureWarning|return func")  # torchrun's and libraries' notices


def _worker_traceback(lines: list[str]) -> str | None:
    """The end of the first traceback in ``lines`` that is not torchrun's own."""
    for start in (i for i, line in enumerate(lines) if line.startswith("Traceback")):
        block = lines[start:]
        end = next((i for i, line in enumerate(block[1:], 1) if line and not line[0].isspace()), len(block) - 1)
        if not _launcher_traceback(block[: end + 1]):
            return " | ".join(line.strip() for line in block[max(end - 4, 1) : end + 1])
    return None


def worker_error(output: str) -> str:
    """The worker's own error in a torchrun log: the end of the first traceback that is not
    torchrun's, else the worker's last lines before torchrun's report (a C++ abort such as
    gloo's "Connection closed by peer") with the failure summary (exit code or signal)."""
    lines = [line.split("]: ", 1)[-1] if line.startswith("[rank") else line for line in output.splitlines()]
    found = _worker_traceback(lines)
    if found:
        return found
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    summary = [line.strip() for line in lines if line.strip().startswith(("exitcode", "traceback :", "rank "))]
    first_launcher = starts[0] if starts else len(lines)
    before = [line.strip() for line in lines[:first_launcher] if line.strip() and not _CHATTER.search(line)][-6:]
    return " | ".join(before + summary[:6]) or " | ".join(lines[-12:])


def rank_error(text: str) -> str:
    """A rank's own stderr file: the end of its traceback, else its last lines (a C++ abort)."""
    lines = text.splitlines()
    return (
        _worker_traceback(lines)
        or " | ".join([line.strip() for line in lines if line.strip() and not _CHATTER.search(line)][-6:])
        or "(no output)"
    )


def rank_logs(log_dir: Path) -> dict[int, Path]:
    """Each local rank's stderr file that torchrun's ``--log-dir`` / ``--redirects`` wrote
    (LOG_DIR/<run id>/attempt_<n>/<local rank>/stderr.log; the last attempt wins)."""
    logs = {}
    for path in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        if path.parent.name.isdigit():
            logs[int(path.parent.name)] = path
    return logs


def failed_rank(output: str) -> tuple[int | None, str]:
    """(local rank, "exitcode ... / signal") of torchrun's "Root Cause" entry, if it printed one."""
    cause = output[output.find("Root Cause") :] if "Root Cause" in output else ""
    rank = re.search(r"local_rank:\s*(\d+)", cause)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    signal = re.search(r"traceback\s*:\s*(Signal .*)", cause)
    how = f"exit code {code.group(1)}" if code else "failed"
    if signal:
        how += f", {signal.group(1).strip()}"
    return (int(rank.group(1)) if rank else None), how


def failure_report(output: str, log_dir: Path) -> str:
    """The failed rank's own last words: the tail of its stderr file (a Python traceback, or the
    lines before a C++ abort, which leaves no traceback), with torchrun's exit code or signal;
    without per-rank files, ``worker_error`` of the combined output."""
    rank, how = failed_rank(output)
    logs = rank_logs(log_dir)
    if rank is None and logs:  # no summary (torchrun itself killed): the first rank that wrote an error
        rank = next((r for r, p in sorted(logs.items()) if "Error" in p.read_text(errors="replace")), None)
    if rank in logs:
        text = logs[rank].read_text(errors="replace")
        return f"rank {rank} ({how}): {rank_error(text)} (its log: {logs[rank]})"
    return worker_error(output)


def launch(spec: dict, workdir: Path, timeout: float) -> list[dict]:
    """Run one configuration as a torchrun job; its per-rank figures, or RuntimeError naming the
    failed rank and its own error (per-rank logs under WORKDIR/ranks-<name>/)."""
    name = spec["name"].replace("/", "_")
    result = workdir / f"result-{name}.json"
    result.unlink(missing_ok=True)
    log_dir = workdir / f"ranks-{name}"
    shutil.rmtree(log_dir, ignore_errors=True)  # a rerun into --workdir: only this job's files
    # --redirects/--tee 3: each rank's stdout and stderr in its own file under log_dir, and on the console
    cmd = [
        *bench_common.torchrun_command(),
        "--standalone",
        f"--nproc_per_node={spec['world']}",
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        "--tee",
        "3",
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(spec),
        "--result",
        str(result),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(spec["threads"])}
    log = workdir / f"log-{name}.txt"  # the whole job's output, kept for --workdir
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        log.write_text(
            (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout or "")
        )
        raise RuntimeError(f"did not finish in {timeout:.0f} s (raise --timeout or lower --steps)") from None
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(
            f"torchrun exited with {proc.returncode}: {failure_report(proc.stdout + proc.stderr, log_dir)} "
            f"(whole log: {log})"
        )
    return json.loads(result.read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="classifier,segmenter", help="comma list of classifier, segmenter")
    p.add_argument(
        "--sizes",
        default="small,paper",
        help="small (small38, deeplabv3plus_small) and/or paper (resnet38d, deeplabv3plus_resnet101)",
    )
    p.add_argument("--worlds", default="1,2", help="ranks per DDP run; the first is the scaling baseline")
    p.add_argument("--parallel", default="zero1,zero2", help="DeepSpeed stages compared with DDP (or none)")
    p.add_argument("--paper-parallel", default="zero2", help="DeepSpeed stages run with the paper-size models")
    p.add_argument("--loaders", default="torch,dali", help="loader back ends; data wait is measured for each")
    p.add_argument("--size", type=int, default=64, help="patch side of the synthetic shards (paper: 224)")
    p.add_argument("--micro", type=int, default=8, help="per-rank batch of the small models")
    p.add_argument("--paper-micro", type=int, default=2, help="per-rank batch of the paper-size models")
    p.add_argument("--steps", type=int, default=5, help="timed steps (small models)")
    p.add_argument("--paper-steps", type=int, default=2, help="timed steps (paper-size models)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (paper-size models: 1)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="training precision (*.precision: bf16 also on CPU; fp16 needs CUDA and ddp)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU: one 'device' per rank")
    p.add_argument("--workers", type=int, default=1, help="loader workers (torch) or threads (DALI) per rank")
    p.add_argument(
        "--image-format",
        default="png",
        choices=["png", "webp", "jpeg"],
        help="encoding of the training images in the synthetic shards (mlps shards)",
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per configuration")
    p.add_argument("--workdir", default="", help="keep the shards and results here (default: a temp dir)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smallest run: small classifier, DDP on --worlds, torch loader, 1 step, 32 px",
    )
    p.add_argument("--abort-rank", type=int, default=-1, help=argparse.SUPPRESS)  # tests: how a dead rank is reported
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # a torchrun job: the spec as JSON
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.stages, args.sizes, args.parallel, args.loaders, args.size = "classifier", "small", "none", "torch", 32
        args.micro, args.steps, args.warmup = 2, 1, 1
    choices = {
        "stages": ("classifier", "segmenter"),
        "sizes": ("small", "paper"),
        "loaders": ("torch", "dali"),
        "parallel": ("none", "zero0", "zero1", "zero2"),
        "paper_parallel": ("none", "zero0", "zero1", "zero2"),
    }
    for flag, allowed in choices.items():
        bad = [v for v in getattr(args, flag).split(",") if v not in allowed]
        if bad or not getattr(args, flag):
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: use a comma list of {', '.join(allowed)}")
    if not all(w.isdigit() and int(w) >= 1 for w in args.worlds.split(",")):
        p.error(f"--worlds {args.worlds!r}: use a comma list of rank counts >= 1, e.g. 1,2")
    for flag in ("size", "micro", "paper_micro", "steps", "paper_steps", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.workers < 0:
        p.error("--warmup and --workers must be >= 0")
    if args.size < 32:
        p.error(f"--size {args.size}: the synthetic patches are at least 32 px wide")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.result)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_") if not args.workdir else None
    workdir = Path(args.workdir or tmp.name)
    try:
        runs = plan_runs(args, prepare_data(args, workdir))
        results, failures = {}, {}
        for spec in runs:
            bench_common.log(f"train {spec['name']} ({spec['world']} rank(s))")
            start = time.perf_counter()
            try:
                results[spec["name"]] = launch(spec, workdir, args.timeout)
                bench_common.log(f"  done in {time.perf_counter() - start:.0f} s")
            except RuntimeError as exc:
                failures[spec["name"]] = str(exc)
                bench_common.log(f"FAILED {spec['name']}: {exc}")
        figures, ratio, baseline = summarise(runs, results, failures)
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "result", "workdir", "abort_rank")}
        bench_common.emit(
            bench_common.make_record(
                "train",
                figures,
                world_size=max(s["world"] for s in runs),
                baseline=baseline,
                ratio=ratio,
                settings=settings,
            )
        )
        return 1 if failures else 0
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
