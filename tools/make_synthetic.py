#!/usr/bin/env python
"""Generate the built-in synthetic H&E dataset in the LUAD-HistoSeg folder layout.

    python tools/make_synthetic.py --out data/demo/luad --train 800 --val 60 --test 60 --size 128

The result is read by tools/make_shards.py like the real LUAD-HistoSeg download.
Rerunning with the same arguments after an interruption finishes the job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from mlps_dist.data.synthetic import write_luad_layout  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (new or empty, or an interrupted run's)")
    parser.add_argument("--train", type=int, default=800, help="train patches (labels in the file names)")
    parser.add_argument("--val", type=int, default=60, help="val patches with masks")
    parser.add_argument("--test", type=int, default=60, help="test patches with masks")
    parser.add_argument("--size", type=int, default=224, help="patch side in pixels (LUAD-HistoSeg: 224)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = write_luad_layout(args.out, args.train, args.val, args.test, size=args.size, seed=args.seed)
    except ValueError as error:
        print(f"make_synthetic: {error}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(f"{summary['out_dir']}: {counts['train']} train, {counts['val']} val, {counts['test']} test patches "
          f"({args.size} px); generated {summary['generated']} in {summary['seconds']:.1f} s "
          f"({summary['patches_per_second'] or '-'} patches/s)")
    labels = ", ".join(f"{c} {f:.2f}" for c, f in summary["train_label_frequency"].items())
    print(f"train label frequency: {labels}")
    for split, freq in summary["pixel_frequency"].items():
        print(f"{split} pixel frequency: " + ", ".join(f"{c} {f:.2f}" for c, f in freq.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
