"""Peak memory and time of ``infer`` on large images: the whole-image path against the
streamed one (images read, predicted and written by row bands), in bytes per input pixel.

    python tools/bench_infer.py                       # 2000 and 4000 px squares (bench_all)
    python tools/bench_infer.py --sides 4000,8000     # the figures in docs/running.md

Each configuration is one ``mlps infer`` process on one synthetic RGB PNG (a
smooth texture, so that Pillow's PNG filters vary as on tissue), with a run of untrained
small models (memory does not depend on the weights): peak RSS from the process's own
rusage, wall time, and (peak - baseline) / pixels, where the baseline is the same command on
a 256 px image (the interpreter, torch and the model). ``--stream-megapixels`` forces each
path (0: streamed; a large value: whole). The classes of both paths are compared byte for
byte. Prints one JSON line (tools/bench_common.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import emit, log, make_record  # noqa: E402
from bench_slides import make_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATHS = {"whole": "1000000", "streamed": "0"}  # --stream-megapixels forcing each path


def write_image(path: Path, side: int) -> None:
    """A side x side RGB PNG of smooth pink-purple texture, written by row bands."""
    import numpy as np

    from mlps_dist.core.pngstream import PngRowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(side, dtype=np.float32)
    with open(path, "wb") as f:
        png = PngRowWriter(f, side, side)
        for top in range(0, side, 256):
            y = np.arange(top, min(top + 256, side), dtype=np.float32)[:, None]
            wave = (np.sin(x / 37.0) * np.cos(y / 23.0) + 1) * 0.5
            band = np.stack([200 + 40 * wave, 120 + 60 * wave, 190 + 30 * (1 - wave)], axis=-1)
            png.write(band.astype(np.uint8))
        png.close()


def run_infer(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one infer process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlps_dist", "infer", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"infer {' '.join(args)} failed: {err.strip()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="2000,4000", help="comma list of image sides in pixels")
    p.add_argument("--patch", type=int, default=500, help="window side (--patch of infer)")
    p.add_argument("--overlap", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workdir", default="", help="keep the images and outputs here (default: a temp dir)")
    args = p.parse_args(argv)
    if not all(s.isdigit() and int(s) >= 256 for s in args.sides.split(",")):
        p.error(f"--sides {args.sides!r}: use a comma list of sides >= 256")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench_infer_") if not args.workdir else None
    work = Path(args.workdir or tmp.name)
    try:
        run = make_run(work / "run", 32)
        flags = [
            "--run",
            str(run),
            "--patch",
            str(args.patch),
            "--overlap",
            str(args.overlap),
            "--batch-size",
            str(args.batch_size),
        ]
        write_image(work / "in-256" / "a.png", 256)
        base, _ = run_infer([*flags, "--input", str(work / "in-256"), "--out", str(work / "out-256")])
        figures = {"baseline_mib": round(base, 1), "images": {}}
        for side in (int(s) for s in args.sides.split(",")):
            write_image(work / f"in-{side}" / "a.png", side)
            entry = figures["images"][f"{side}x{side}"] = {}
            for name, threshold in PATHS.items():
                log(f"infer {side} x {side}, {name}")
                out = work / f"out-{side}-{name}"
                peak, seconds = run_infer(
                    [*flags, "--input", str(work / f"in-{side}"), "--out", str(out), "--stream-megapixels", threshold]
                )
                entry[name] = {
                    "peak_mib": round(peak, 1),
                    "seconds": round(seconds, 1),
                    "bytes_per_pixel": round((peak - base) * 2**20 / side**2, 2),
                }
            entry["same_classes"] = (work / f"out-{side}-whole" / "a.png").read_bytes() == (
                work / f"out-{side}-streamed" / "a.png"
            ).read_bytes()
        ratio = {
            side: (
                round(e["streamed"]["bytes_per_pixel"] / e["whole"]["bytes_per_pixel"], 3)
                if e["whole"]["bytes_per_pixel"] > 0
                else None
            )
            for side, e in figures["images"].items()
        }
        emit(
            make_record(
                "infer",
                figures,
                world_size=1,
                baseline="the whole-image path on the same image, memory above a 256 px run of the same command",
                ratio={"streamed_vs_whole_memory": ratio},
                settings=vars(args),
            )
        )
        return 0 if all(e["same_classes"] for e in figures["images"].values()) else 1
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
