"""``mlps visualize``: a run's contact sheet (mlps_dist/predict/visualize.py).

mlps visualize --run runs/demo --split val --n 8 --out sheet.png
mlps visualize --run runs/demo --split train --n 6 --out train.png   # pseudo masks
mlps visualize --run runs/real --split test --cams --out cams.png    # CAMs on any split
"""

from __future__ import annotations

from mlps_dist.cli import parser

HELP = "contact sheet of a run: image, ground truth, pseudo masks, CAMs, prediction per sample"
EPILOG = """\
Columns: image | stain-normalised image (runs with data.stain: what the networks see) | ground
truth (val/test) | pseudo mask per layer (train, from RUN/pseudo_masks/train) | with --cams, the
stage-1 classifier's Grad-CAM per masks.layers, argmax over the patch's labelled classes,
computed as the mask pass does (any split) | prediction (when the run has a segmenter; gated
with the stage-1 classifier unless --no-gate or it is missing). White in a mask = ignore /
background. Samples are spread evenly over the split."""


def build_parser():
    p = parser("visualize", HELP, EPILOG)
    p.add_argument("--run", required=True, help="run directory (holds config.yaml)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="shard split to show")
    p.add_argument("--n", type=int, default=8, help="samples (rows)")
    p.add_argument("--out", required=True, help="image file to write (.png, .jpg)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="segmenter checkpoint")
    p.add_argument("--no-gate", action="store_true", help="show the segmenter's prediction without the gate")
    p.add_argument("--cams", action="store_true", help="add the stage-1 Grad-CAM label maps (masks.layers)")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from mlps_dist.predict.visualize import contact_sheet

    print(
        contact_sheet(
            args.run,
            args.out,
            split=args.split,
            count=args.n,
            checkpoint=args.checkpoint,
            gate=not args.no_gate,
            cams_wanted=args.cams,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
