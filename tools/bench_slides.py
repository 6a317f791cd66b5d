"""Benchmark the whole-slide tools: tissue megapixels per second of segment_slides on 1 and 2
ranks against the per-tile loop users write by hand, and tiling throughput on 1 and 2 ranks.

    python tools/bench_slides.py [--width 4096 --height 3072 --slide-mpp 0.5 --model-mpp 1.0]

One synthetic slide (pyramidal TIFF) and a run with untrained small models (speed does not
depend on the weights). The hand-written loop, measured in the same run on the same slide:
for every tile of the grid, read the region from level 0 with OpenSlide, resize it to the
patch, predict it alone (through mlps_dist.predict.predictor, as segment_slides does) and write its
class PNG. segment_slides reads the same tiles (stride = patch, no overlap, so both predict
the same tile count on tissue) but only where there is tissue, from the pyramid level
nearest the model's MPP, in batches, with reader threads ahead of the model. Prints one
JSON line (tools/bench_common.py).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import emit, log, make_record, ratio, torchrun_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_run(run_dir: Path, patch: int) -> Path:
    import torch

    from mlps_dist.config import config_from_dict, save_config
    from mlps_dist.core import layout
    from mlps_dist.models import create_classifier, create_segmenter
    from mlps_dist.train.checkpoint import save_model_file

    classes = ["TE", "NEC", "LYM", "TAS"]
    cfg = config_from_dict(
        {
            "run_dir": str(run_dir),
            "data": {"root": "none", "image_size": patch},
            "classifier": {"model": "small38"},
            "segmenter": {"model": "deeplabv3plus_small"},
        }
    )
    save_config(cfg, layout.config_file(run_dir))
    torch.manual_seed(0)
    for stage, factory, name in (
        ("classifier", create_classifier, "small38"),
        ("segmenter", create_segmenter, "deeplabv3plus_small"),
    ):
        meta = {"name": name, "num_classes": 4, "classes": classes, "config": cfg.to_dict()}
        save_model_file(layout.model_file(run_dir, stage), factory(name, 4).state_dict(), meta)
    return run_dir


def hand_loop(slide_path: Path, run_dir: Path, out: Path, model_mpp: float, patch: int) -> tuple[float, int]:
    """The loop users write: every grid tile read at level 0, resized, predicted alone, written."""
    import numpy as np
    import openslide
    import torch
    from PIL import Image

    from mlps_dist.predict.predictor import create_predictor

    # On the device segment_slides uses, so that the ratio compares loops, not devices.
    predictor, _ = create_predictor(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    osr = openslide.OpenSlide(str(slide_path))
    mpp = float(osr.properties["openslide.mpp-x"])
    size0 = int(round(patch * model_mpp / mpp))
    width, height = osr.dimensions
    out.mkdir(parents=True, exist_ok=True)
    start, count = time.perf_counter(), 0
    for y in range(0, height, size0):
        for x in range(0, width, size0):
            region = osr.read_region((x, y), 0, (size0, size0)).convert("RGB").resize((patch, patch), Image.LANCZOS)
            tile = torch.from_numpy(np.asarray(region).copy()).permute(2, 0, 1)[None]
            classes = predictor(tile).classes()[0].to(torch.uint8).numpy()
            Image.fromarray(classes).save(out / f"{x}_{y}.png")
            count += 1
    return time.perf_counter() - start, count


def hand_main(argv: list[str]) -> int:
    """``--hand RUN SLIDE OUT MODEL_MPP PATCH``: the hand-written loop as its own process, so
    its time includes start-up and model loading like the segment_slides commands."""
    run_dir, slide, out, model_mpp, patch = argv
    seconds, tiles = hand_loop(Path(slide), Path(run_dir), Path(out), float(model_mpp), int(patch))
    print(json.dumps({"loop_seconds": seconds, "tiles": tiles}))
    return 0


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start, proc.stdout


def torchrun(world: int) -> list[str]:
    return [*torchrun_command(), "--standalone", f"--nproc_per_node={world}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=3072)
    p.add_argument("--slide-mpp", type=float, default=0.5, help="level-0 MPP of the slide (0.5 = 20x)")
    p.add_argument("--model-mpp", type=float, default=1.0, help="MPP the model reads tiles at")
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--worlds", default="1,2")
    p.add_argument(
        "--extent",
        type=float,
        default=0.3,
        help="tissue blob half-axes as a share of the slide (0.3: about 30%% of the slide is tissue)",
    )
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    import numpy as np
    from PIL import Image

    from mlps_dist.synthetic.slides import write_synthetic_slide

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_slides_"))
    slide = work / "slides" / "bench.tiff"
    log(f"writing a {args.width} x {args.height} slide at {args.slide_mpp} um/px in {work}")
    write_synthetic_slide(
        slide,
        work / "ann" / "bench.geojson",
        args.width,
        args.height,
        seed=0,
        mpp=args.slide_mpp,
        cell_px=int(600 / args.slide_mpp),
        extent=args.extent,
    )
    run_dir = make_run(work / "run", args.patch)
    figures, worlds = {}, [int(w) for w in args.worlds.split(",")]

    log("hand-written loop")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--hand",
            str(run_dir),
            str(slide),
            str(work / "hand"),
            str(args.model_mpp),
            str(args.patch),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    hand_s = time.perf_counter() - start
    hand = json.loads(proc.stdout.strip().splitlines()[-1])
    hand_tiles = hand["tiles"]
    for world in worlds:
        out = work / f"maps{world}"
        log(f"segment_slides on {world} rank(s)")
        seconds, stdout = timed(
            torchrun(world)
            + [
                "-m",
                "mlps_dist",
                "--",
                "segment",
                "--run",
                str(run_dir),
                "--slides",
                str(slide),
                "--out",
                str(out),
                "--model-mpp",
                str(args.model_mpp),
                "--map-mpp",
                str(args.model_mpp * args.patch / 12),
                "--stride",
                str(args.patch),
                "--batch-size",
                str(args.batch_size),
            ]
        )
        summary = json.loads((out / "bench" / "summary.json").read_text())
        tissue = np.asarray(Image.open(out / "bench" / "tissue.png")) > 0
        tissue_mp = tissue.sum() * (summary["map_mpp"] / args.slide_mpp) ** 2 / 1e6
        work_s = float(re.search(r" in ([0-9.]+) s ", stdout).group(1))  # after start-up and model loading
        figures[f"segment_x{world}"] = {
            "seconds": round(seconds, 2),
            "work_seconds": round(work_s, 2),
            "tiles": summary["tiles"],
            "tissue_mp_per_s": round(tissue_mp / seconds, 3),
            "work_tissue_mp_per_s": round(tissue_mp / work_s, 3),
        }
        figures["tissue_mp"] = round(float(tissue_mp), 3)
        log(f"tiling on {world} rank(s)")
        tiled = work / f"shards{world}"
        seconds, _ = timed(
            torchrun(world)
            + [
                "-m",
                "mlps_dist",
                "--",
                "tile",
                "--slides",
                str(slide),
                "--out",
                str(tiled),
                "--mpp",
                str(args.model_mpp),
                "--tile",
                str(args.patch),
                "--split-ratios",
                "1,0,0",
            ]
        )
        count = json.loads((tiled / "info.json").read_text())["splits"]["train"]["count"]
        figures[f"tile_x{world}"] = {
            "seconds": round(seconds, 2),
            "tiles": count,
            "tiles_per_s": round(count / seconds, 2),
        }
    figures["hand_loop"] = {
        "seconds": round(hand_s, 2),
        "loop_seconds": round(hand["loop_seconds"], 2),
        "tiles": hand_tiles,
        "tissue_mp_per_s": round(figures["tissue_mp"] / hand_s, 3),
        "work_tissue_mp_per_s": round(figures["tissue_mp"] / hand["loop_seconds"], 3),
    }
    speedups = {
        f"segment_x{w}_vs_hand": ratio(
            figures[f"segment_x{w}"]["tissue_mp_per_s"], figures["hand_loop"]["tissue_mp_per_s"]
        )
        for w in worlds
    }
    speedups.update(
        {
            f"segment_x{w}_vs_hand_work": ratio(
                figures[f"segment_x{w}"]["work_tissue_mp_per_s"], figures["hand_loop"]["work_tissue_mp_per_s"]
            )
            for w in worlds
        }
    )
    emit(
        make_record(
            "slides",
            figures,
            world_size=max(worlds),
            baseline="hand-written per-tile loop (level-0 "
            "read, one tile per forward pass, PNG per tile), same slide, same run",
            ratio=speedups,
            settings=vars(args),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(hand_main(sys.argv[2:]) if sys.argv[1:2] == ["--hand"] else main())
