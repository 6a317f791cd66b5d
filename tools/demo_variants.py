#!/usr/bin/env python
"""Run the demo pipeline on synthetic and real-tissue data variants and tabulate the results.

    python tools/demo_variants.py --held-out                       # the variants nobody tuned on
    python tools/demo_variants.py --real --tiles ../shared/real/kather2016_dev   # real, real-stain
    python tools/demo_variants.py --variants default,pale --seeds 0,1 segmenter.epochs=10
    python tools/demo_variants.py --tuning --runs runs/variants --restart-from segmenter   # a new stage-3 setting

For every variant and seed: generate the data (mlps synthetic, demo sizes; for the
real-tissue variants mlps mosaics from --tiles), make shards (mlps shards
--layout luad), run launch/pipeline.sh CONFIG RUN data.root=...
with the extra key=value overrides, then collect the test mIoU with and without the gate
(RUN/metrics/test.json), the stage-1 validation score (best and last, RUN/log.jsonl), the
pseudo-mask mIoU per layer (RUN/metrics/pseudo_masks.json) and the wall time. Prints a
markdown table and keeps one JSON line per (variant, seed) in --results.

Resumable: a finished (variant, seed) is read back, not rerun, when it was made with the same
config file contents and overrides (a row made with other settings is rerun, and the pipeline
then names what changed in its run directory; use a new --runs for a new setting); an
interrupted one continues where it stopped (the data tools and the pipeline resume);
``--restart-from STAGE`` redoes STAGE and the later ones in run directories that exist (the
wall time is then this call's, those stages only). The
white-background channel is switched on for a variant where glass is white and tissue is not,
or for every variant when the config and overrides set masks.background.max_saturation
(--background auto).

Real tissue (``real``, ``real-stain``): mosaics of real single-class tiles (--tiles, a class-per-
folder collection: default ../shared/real/kather2016_dev beside the checkout when it exists),
--real-counts 600,40,80 patches of 150 px, split by source image: --real-sources
TRAIN/VAL/TEST, default 01,02,03/04/05 (tuning: train on images 01-03, model selection on 04,
test on 05). ``real-stain`` is the same with a strong stain and scanner change on val/test
(make_mosaics --stain-change), training patches untouched. --swap-val-test makes image 05 the
validation image and reports the test figures on image 04, whose test patches no tuning looked
at; its runs are kept apart (variant name ``real-05v04t``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a source checkout

from mlps_dist.core import layout  # noqa: E402
from mlps_dist.core.fileio import atomic_write_text  # noqa: E402
from mlps_dist.run import artifacts  # noqa: E402
from mlps_dist.synthetic.options import (  # noqa: E402
    HELD_OUT_VARIANTS,
    TUNING_VARIANTS,
    VARIANTS,
    variant_white_is_white,
)

REAL_VARIANTS = ("real", "real-stain")  # mlps mosaics from --tiles; real-stain: --stain-change on val/test
REAL_STAIN = {"real": False, "real-stain": True}
DEFAULT_TILES = REPO.parent / "shared" / "real" / "kather2016_dev"
DEFAULT_REAL_SOURCES = "01,02,03/04/05"
REAL_MPP = 0.495  # Kather et al. 2016 tiles (20x Aperio); recorded in the shards' info.json


def _real_sources(text: str) -> tuple[list[str], list[str], list[str]]:
    parts = [[s.strip() for s in part.split(",") if s.strip()] for part in text.split("/")]
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected TRAIN/VAL/TEST source images, e.g. {DEFAULT_REAL_SOURCES}"
        )
    return parts[0], parts[1], parts[2]


def _real_counts(text: str) -> tuple[int, int, int]:
    try:
        counts = tuple(int(v) for v in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three patch counts TRAIN,VAL,TEST such as 600,40,80")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"tuning variants: {', '.join(TUNING_VARIANTS)}; "
        f"held out: {', '.join(HELD_OUT_VARIANTS)}; "
        f"real tissue (--tiles): {', '.join(REAL_VARIANTS)}",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--variants", help=f"comma-separated names from: {', '.join(VARIANTS)}")
    which.add_argument("--tuning", action="store_true", help="the variants the demo settings may be tuned on")
    which.add_argument("--held-out", action="store_true", help="the variants kept out of all tuning")
    which.add_argument("--all", action="store_true", help="every variant (the real ones where --tiles is found)")
    which.add_argument("--real", action="store_true", help=f"the real-tissue variants: {', '.join(REAL_VARIANTS)}")
    p.add_argument("--seeds", default="0", help="comma-separated data seeds (default 0)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--data", default="data/variants", help="folder for the generated datasets")
    p.add_argument("--runs", default="runs/variants", help="folder for the run directories")
    p.add_argument("--results", default=None, help="JSON lines file (default: RUNS/results.jsonl)")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--val", type=int, default=80)
    p.add_argument("--test", type=int, default=100)
    real = p.add_argument_group("real-tissue variants")
    real.add_argument(
        "--tiles",
        default=str(DEFAULT_TILES) if DEFAULT_TILES.is_dir() else None,
        help="class-per-folder real tiles for make_mosaics (default ../shared/real/kather2016_dev "
        "beside the checkout, when it exists)",
    )
    real.add_argument(
        "--real-counts",
        type=_real_counts,
        default=(600, 40, 80),
        help="train,val,test patches of the real variants (default 600,40,80)",
    )
    real.add_argument(
        "--real-sources",
        type=_real_sources,
        default=_real_sources(DEFAULT_REAL_SOURCES),
        help=f"TRAIN/VAL/TEST source images, comma-separated in each (default {DEFAULT_REAL_SOURCES})",
    )
    real.add_argument(
        "--swap-val-test",
        action="store_true",
        help="real variants: val on the test image and test on the val image (default: val 05, "
        "test 04), to report on test patches no tuning looked at",
    )
    real.add_argument("--data-only", action="store_true", help="make the data and shards, run no pipeline")
    p.add_argument(
        "--background",
        choices=("auto", "on", "off", "config"),
        default="auto",
        help="masks.background.enabled: auto = on where white is white, or everywhere when CONFIG sets masks.background.max_saturation; config = leave it to CONFIG",  # noqa: E501
    )
    p.add_argument(
        "--restart-from",
        choices=artifacts.STAGES,
        default=None,
        help="in run directories that exist, redo this stage and the ones after it (launch/pipeline.sh "
        "--restart-from): a new setting of a later stage measured on the earlier stages' results",
    )
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs, run nothing")
    p.add_argument("overrides", nargs="*", help="key=value passed to every stage")
    args = p.parse_args(argv)
    if args.tuning:
        args.names = list(TUNING_VARIANTS)
    elif args.held_out:
        args.names = list(HELD_OUT_VARIANTS)
    elif args.real:
        args.names = list(REAL_VARIANTS)
    elif args.all or not args.variants:
        args.names = list(VARIANTS) + (list(REAL_VARIANTS) if args.tiles and args.all else [])
    else:
        args.names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in VARIANTS and n not in REAL_VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; valid variants: {', '.join([*VARIANTS, *REAL_VARIANTS])}")
    if any(n in REAL_VARIANTS for n in args.names) and not args.tiles:
        p.error("the real variants need --tiles DIR (a folder of class folders of tiles, e.g. kather2016_dev)")
    if args.swap_val_test:
        train, val, test = args.real_sources
        args.real_sources = (train, test, val)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    args.results = Path(args.results or Path(args.runs) / "results.jsonl")
    return args


def role(name: str, args=None) -> str:
    if name in REAL_VARIANTS:
        return "held-out" if args is not None and args.swap_val_test else "tuning"
    return "tuning" if name in TUNING_VARIANTS else "held-out" if name in HELD_OUT_VARIANTS else "-"


def run_name(args, name: str) -> str:
    """The row's and folders' name: a real variant with other source images than the default
    carries them (``real-05v04t``: val 05, test 04; the train images too when they differ)."""
    if name not in REAL_VARIANTS:
        return name
    train, val, test = args.real_sources
    default = _real_sources(DEFAULT_REAL_SOURCES)
    if (train, val, test) == default:
        return name
    tag = "" if train == default[0] else ".".join(train) + "r"
    return f"{name}-{tag}{'.'.join(val)}v{'.'.join(test)}t"


def saturation_limited(config: str, overrides: list[str]) -> bool:
    """Whether the white channel of CONFIG with these overrides also asks white to be near grey
    (masks.background.max_saturation), which tells glass from pale tinted tissue."""
    from mlps_dist.config import load_config

    return load_config(config, overrides).masks.background.max_saturation > 0


def background_enabled(name: str, mode: str, limited: bool) -> bool | None:
    """masks.background.enabled for a variant: ``auto`` is on where glass is the only thing
    brighter than grey 200, or everywhere when the white channel is ``limited`` by saturation."""
    if mode != "auto":
        return {"on": True, "off": False, "config": None}[mode]
    if name in REAL_VARIANTS:  # real glass is white; the masks leave white as ignore, as LUAD-HistoSeg
        return True
    return variant_white_is_white(name) or limited


def _run(cmd: list[str], log: Path) -> None:
    # Children (and their torchrun workers) import this checkout's mlps_dist, as this script does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        status = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise RuntimeError(f"'{' '.join(cmd[:3])} ...' exited with {status}; see {log}, then rerun to resume")


def data_commands(args, name: str, seed: int, data: Path) -> list[list[str]]:
    """The commands that make one (variant, seed)'s raw folder and its shards."""
    py = sys.executable
    if name in REAL_VARIANTS:
        (train, val, test), counts = args.real_sources, args.real_counts
        make = [
            py,
            "-m",
            "mlps_dist",
            "mosaics",
            "--tiles",
            str(args.tiles),
            "--out",
            str(data / "raw"),
            "--train",
            str(counts[0]),
            "--val",
            str(counts[1]),
            "--test",
            str(counts[2]),
            "--split-by-source",
            "--sources-train",
            ",".join(train),
            "--sources-val",
            ",".join(val),
            "--sources-test",
            ",".join(test),
            "--seed",
            str(seed),
        ]
        make += ["--stain-change"] if REAL_STAIN[name] else []
        mpp = ["--mpp", str(REAL_MPP)]
    else:
        make = [
            py,
            "-m",
            "mlps_dist",
            "synthetic",
            "--out",
            str(data / "raw"),
            "--variant",
            name,
            "--seed",
            str(seed),
            "--train",
            str(args.train),
            "--val",
            str(args.val),
            "--test",
            str(args.test),
        ]
        mpp = []
    return [
        make,
        [
            py,
            "-m",
            "mlps_dist",
            "shards",
            "--layout",
            "luad",
            "--src",
            str(data / "raw"),
            "--out",
            str(data / "shards"),
            *mpp,
        ],
    ]


def run_one(args, name: str, seed: int) -> None:
    """Data, shards and the pipeline of one (variant, seed); every step resumes or skips."""
    key = f"{run_name(args, name)}-s{seed}"
    data, run_dir = Path(args.data) / key, Path(args.runs) / key
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{key}.log"
    # make_mosaics refuses a folder made with other counts or sources, so the real variants'
    # tools always run (they resume in seconds); a synthetic variant's finished shards are kept.
    if name in REAL_VARIANTS or not (data / "shards" / "info.json").is_file():
        for cmd in data_commands(args, name, seed, data):
            _run(cmd, log)
    if not args.data_only:
        _run(pipeline_command(args, name, data, run_dir), log)


def pipeline_command(args, name: str, data: Path, run_dir: Path) -> list[str]:
    """launch/pipeline.sh on the variant's shards, with its white-channel switch and the
    overrides; --restart-from only where the run directory already holds a run."""
    overrides = [f"data.root={data / 'shards'}", *args.overrides]
    enabled = background_enabled(name, args.background, args.limited)
    if enabled is not None:
        overrides.insert(1, f"masks.background.enabled={str(enabled).lower()}")
    restart = (
        ["--restart-from", args.restart_from] if args.restart_from and layout.config_file(run_dir).is_file() else []
    )
    return ["bash", "launch/pipeline.sh", *restart, args.config, str(run_dir), *overrides]


def _events(run_dir: Path) -> list[dict]:
    path = layout.log_file(run_dir)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage1_val_scores(events: list[dict]) -> list[float]:
    """Classifier validation score per epoch; an epoch validated again after a resume counts once."""
    by_step = {e["step"]: e["val/score"] for e in events if e.get("stage") == "classifier" and "val/score" in e}
    return [by_step[step] for step in sorted(by_step)]


def _pda_start(run_dir: Path) -> int | None:
    import yaml

    path = layout.config_file(run_dir)
    if not path.is_file():
        return None
    return ((yaml.safe_load(path.read_text()) or {}).get("classifier", {}).get("pda") or {}).get("start_epoch")


COLLAPSE_DROP = 0.10  # stage 1 "collapsed" when a score after PDA onset falls this far below the best before


def pda_collapse(scores: list[float], start: int | None) -> dict:
    """Best validation score before PDA onset, lowest after it, and whether stage 1 collapsed."""
    if start is None or not 0 < start < len(scores):
        return {
            "pda_start_epoch": start,
            "stage1_best_before_pda": None,
            "stage1_min_after_pda": None,
            "stage1_collapsed": None,
        }
    before, after = max(scores[:start]), min(scores[start:])
    return {
        "pda_start_epoch": start,
        "stage1_best_before_pda": before,
        "stage1_min_after_pda": after,
        "stage1_collapsed": after < before - COLLAPSE_DROP,
    }


def collect(run_dir: Path, data: Path) -> dict:
    """The figures of one finished run (None where a file is missing)."""
    events = _events(run_dir)
    val_scores = stage1_val_scores(events)
    test = json.loads(layout.metrics_file(run_dir, "test").read_text())
    masks_path = layout.masks_report_file(run_dir)
    pseudo = json.loads(masks_path.read_text()) if masks_path.is_file() else {}
    # {"classifier": {...}, "<split>": {layer: metrics}}: the first split (val) is reported
    pm_split = next((v for k, v in pseudo.items() if k != "classifier" and isinstance(v, dict)), {})
    times = [e["time"] for e in events if "time" in e]
    marker = data / "raw" / "synthetic.json"  # real variants (make_mosaics) record no data time
    summary = json.loads(marker.read_text()).get("summary", {}) if marker.is_file() else {}
    return {
        "test_miou_gated": test.get("miou"),
        "test_miou_ungated": test.get("ungated", {}).get("miou"),
        "test_iou_gated": test.get("iou"),
        "stage1_best_val": max(val_scores) if val_scores else None,
        "stage1_last_val": val_scores[-1] if val_scores else None,
        "stage1_val_per_epoch": val_scores,
        **pda_collapse(val_scores, _pda_start(run_dir)),
        "pseudo_mask_miou": {layer: m.get("miou") for layer, m in pm_split.items()},
        "pipeline_wall_s": round(times[-1] - times[0], 1) if times else None,
        "data_wall_s": summary.get("seconds"),
    }


def settings(args, name: str | None = None) -> dict:
    """What a results row must have been made with to be reused by this call (a real
    variant's row also with the same tiles folder and patch counts)."""
    digest = hashlib.sha256(Path(args.config).read_bytes()).hexdigest()
    record = {"config": args.config, "config_sha256": digest, "overrides": list(args.overrides)}
    if name in REAL_VARIANTS:
        record.update(
            tiles=str(args.tiles),
            real_counts=list(args.real_counts),
            real_sources=[list(part) for part in args.real_sources],
        )
    return record


def reusable(row: dict, wanted: dict) -> bool:
    return all(row.get(key) == value for key, value in wanted.items())


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["seed"]): r for r in rows}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in results.values()))


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(rows: list[dict]) -> str:
    layers = sorted({layer for r in rows for layer in r.get("pseudo_mask_miou", {})})
    head = [
        "variant",
        "role",
        "seed",
        "white ch.",
        "test mIoU gated",
        "ungated",
        "stage-1 val best",
        "stage-1 val last",
        "stage-1 min after PDA",
        *[f"PM {layer}" for layer in layers],
        "wall (min)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        wall = r.get("wall_s")
        white = {True: "on", False: "off"}.get(r.get("background"), "config")
        after_pda = pct(r.get("stage1_min_after_pda")) + (" (collapsed)" if r.get("stage1_collapsed") else "")
        masks = [pct(r.get("pseudo_mask_miou", {}).get(layer)) for layer in layers]
        cells = [
            r["variant"],
            r["role"],
            str(r["seed"]),
            white,
            pct(r.get("test_miou_gated")),
            pct(r.get("test_miou_ungated")),
            pct(r.get("stage1_best_val")),
            pct(r.get("stage1_last_val")),
            after_pda,
            *masks,
            "-" if wall is None else f"{wall / 60:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = load_results(args.results)
    args.limited = False if args.data_only else saturation_limited(args.config, args.overrides)
    for name in args.names:
        label, wanted = run_name(args, name), settings(args, name)
        for seed in args.seed_list:
            key = f"{label}-s{seed}"
            run_dir, data = Path(args.runs) / key, Path(args.data) / key
            if not args.data_only and (
                args.table_only or ((label, seed) in results and reusable(results[(label, seed)], wanted))
            ):
                continue
            steps = "data and shards" if args.data_only else "data, shards, pipeline"
            print(f"[variants] {key}: {steps} (log: {run_dir.parent / (key + '.log')})", flush=True)
            start = time.time()
            try:
                run_one(args, name, seed)
            except RuntimeError as error:
                print(f"[variants] {key}: {error}", file=sys.stderr)
                return 1
            if args.data_only:
                continue
            row = {
                "variant": label,
                "seed": seed,
                "role": role(name, args),
                "background": background_enabled(name, args.background, args.limited),
                **wanted,
                **collect(run_dir, data),
            }
            row["wall_s"] = round(time.time() - start, 1)  # this call's time (all steps when not resumed)
            results[(label, seed)] = row
            save_results(args.results, results)
            print(
                f"[variants] {key}: test mIoU {pct(row['test_miou_gated'])} (gated), "
                f"stage-1 best val {pct(row['stage1_best_val'])}, {row['wall_s'] / 60:.1f} min",
                flush=True,
            )
    if args.data_only:
        return 0
    labels = [run_name(args, n) for n in args.names]
    chosen = [results[(n, s)] for n in labels for s in args.seed_list if (n, s) in results]
    print(markdown_table(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
