"""``mlps synthetic``: the built-in synthetic H&E dataset in the LUAD-HistoSeg folder layout
(mlps_dist/synthetic/patches.py), the demo's data.

    mlps synthetic --out data/demo/raw --train 600 --val 80 --test 100 --size 96
    mlps synthetic --out data/pale/raw --variant pale --h-strength 0.5

The result is read by ``mlps shards`` like the real LUAD-HistoSeg download. Rerunning with
the same arguments after an interruption finishes the job.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlps_dist.cli import parser as cli_parser

HELP = "generate the synthetic H&E patch dataset (LUAD-HistoSeg layout) the demo trains on"


def _floats(count: int):
    def parse(text: str) -> tuple:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"'{text}': expected {count} comma-separated numbers")
        return values

    return parse


def _variant_epilog() -> str:
    from mlps_dist.synthetic.options import HELD_OUT_VARIANTS, TUNING_VARIANTS, VARIANT_HELP, VARIANTS

    lines = ["named variants (--variant NAME; explicit options override the variant's values):"]
    for name in VARIANTS:
        role = "tuning" if name in TUNING_VARIANTS else "held out" if name in HELD_OUT_VARIANTS else ""
        lines.append(f"  {name:17s} {VARIANT_HELP[name]}" + (f"  [{role}]" if role else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli_parser("synthetic", HELP, _variant_epilog())
    parser.add_argument("--out", required=True, help="output folder (new or empty, or an interrupted run's)")
    parser.add_argument("--train", type=int, default=800, help="train patches (labels in the file names)")
    parser.add_argument("--val", type=int, default=60, help="val patches with masks")
    parser.add_argument("--test", type=int, default=60, help="test patches with masks")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--variant", default="default", help="named set of the options below (see the list)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes drawing patches (same bytes for any number; the cores, at most 8)",
    )
    group = parser.add_argument_group("data options (default: the variant's value)")
    group.add_argument("--size", type=int, help="patch side in pixels (default variant: 96; LUAD-HistoSeg: 224)")
    group.add_argument("--h-strength", type=float, help="x hematoxylin concentration (1.0)")
    group.add_argument("--e-strength", type=float, help="x eosin concentration (1.0)")
    group.add_argument("--h-vector", type=_floats(3), help="hematoxylin OD vector R,G,B (0.650,0.704,0.286)")
    group.add_argument("--e-vector", type=_floats(3), help="eosin OD vector R,G,B (0.072,0.990,0.105)")
    group.add_argument("--hue-shift", type=float, help="degrees both stain vectors turn about the grey axis (0)")
    group.add_argument("--brightness", type=float, help="x scanner lamp; glass saturates above ~1.02 (1.0)")
    group.add_argument("--white-balance", type=_floats(3), help="lamp gains R,G,B (1,1,1)")
    group.add_argument("--gamma", type=float, help="scanner tone curve, > 1 lifts mid-tones (1.0)")
    group.add_argument("--nuclear-size", type=float, help="x nucleus radius (1.0)")
    group.add_argument("--nuclear-density", type=float, help="x nuclei per area (1.0)")
    group.add_argument("--texture-scale", type=float, help="x size of all texture, > 1 coarser (1.0)")
    group.add_argument(
        "--class-weights", type=_floats(4), help="how often TE,NEC,LYM,TAS are drawn (0.38,0.14,0.20,0.28)"
    )
    group.add_argument("--tissues-per-patch", type=_floats(4), help="P(1,2,3,4 tissues) (0.35,0.35,0.20,0.10)")
    group.add_argument("--white-prob", type=float, help="share of patches showing white glass (0.4)")
    return parser.parse_args(argv)


OPTION_FLAGS = (
    "size",
    "h_strength",
    "e_strength",
    "h_vector",
    "e_vector",
    "hue_shift",
    "brightness",
    "white_balance",
    "gamma",
    "nuclear_size",
    "nuclear_density",
    "texture_scale",
    "class_weights",
    "tissues_per_patch",
    "white_prob",
)


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.synthetic.options import SyntheticOptionError, variant_options
    from mlps_dist.synthetic.patches import write_luad_layout

    args = parse_args(argv)
    try:
        options = variant_options(args.variant, **{k: getattr(args, k) for k in OPTION_FLAGS})
        summary = write_luad_layout(
            args.out,
            args.train,
            args.val,
            args.test,
            seed=args.seed,
            options=options,
            variant=args.variant,
            workers=max(1, args.workers),
        )
    except (SyntheticOptionError, ValueError) as error:
        print(f"mlps synthetic: {error}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(
        f"{summary['out_dir']}: {counts['train']} train, {counts['val']} val, {counts['test']} test patches "
        f"({options.size} px, variant {args.variant}); generated {summary['generated']} in "
        f"{summary['seconds']:.1f} s ({summary['patches_per_second'] or '-'} patches/s)"
    )
    labels = ", ".join(f"{c} {f:.2f}" for c, f in summary["train_label_frequency"].items())
    print(f"train label frequency: {labels}")
    for split, freq in summary["pixel_frequency"].items():
        print(f"{split} pixel frequency: " + ", ".join(f"{c} {f:.2f}" for c, f in freq.items()))
    return 0
