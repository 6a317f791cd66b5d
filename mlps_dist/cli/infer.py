"""``mlps infer``: segment any folder of H&E images with a trained run (torch, one or many
ranks) or an exported model (onnxruntime, no torch): mlps_dist/deploy/infer.py.

    mlps infer --run runs/luad --input slides/patches --out predictions/
    mlps infer --model export/model.onnx --input slides/patches --out predictions/
    torchrun --standalone --nproc_per_node=4 -m mlps_dist -- infer --run runs/luad --input big/ --out pred/
"""

from __future__ import annotations

from mlps_dist.cli import parser

HELP = "segment images of any size with a run (--run) or an exported model (--model): class PNGs + overlays"
EPILOG = """\
For every input REL/NAME.ext two files: OUT/REL/NAME.png (palettised class indices) and
OUT/REL/NAME_overlay.png. Windows of the training patch size, --overlap shared with the
neighbour, scores averaged where windows overlap; both back ends give the same classes up to
float rounding. Images over --stream-megapixels are read, predicted and written by row bands.
With --run under torchrun the files are split over the ranks (each exactly once)."""


def parse_args(argv):
    from PIL import Image

    from mlps_dist.deploy.infer import STREAM_MEGAPIXELS

    p = parser("infer", HELP, EPILOG)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory with config.yaml and segmenter/ (classifier/ for the gate)")
    source.add_argument("--model", help="model.onnx written by mlps export (model.json next to it)")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default=None, help="--run only (unset: best)")
    p.add_argument("--no-gate", action="store_true", help="--run only: skip the classification gate")
    p.add_argument(
        "--gate-threshold", type=float, default=None, help="--run only (unset: evaluate.gate_threshold of the run)"
    )
    p.add_argument("--patch", type=int, default=0, help="window side (0: the stored training patch size)")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of a window shared with its neighbour")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by mlps infer")
    p.add_argument(
        "--stain-scope",
        choices=("set", "image"),
        default=None,
        help="runs with stain normalisation: estimate the stains once over all inputs (set) or "
        "for each image on its own (image); unset: the method's own (od_match: set, macenko and "
        "reinhard: image). Give a set the images of one lab or scanner",
    )
    p.add_argument(
        "--stream-megapixels",
        type=float,
        default=STREAM_MEGAPIXELS,
        help="read, predict and write images with more pixels by row bands, in memory set by "
        "the window and the width (0: every image)",
    )
    p.add_argument(
        "--max-megapixels",
        type=float,
        default=Image.MAX_IMAGE_PIXELS / 1e6,
        help="refuse larger images (Pillow's decompression-bomb limit)",
    )
    args = p.parse_args(argv)
    if not 0 < args.max_megapixels < float("inf"):
        p.error(f"--max-megapixels {args.max_megapixels}: must be a finite number > 0")
    if not 0 <= args.stream_megapixels < float("inf"):
        p.error(f"--stream-megapixels {args.stream_megapixels}: must be a finite number >= 0")
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if args.patch and args.patch < 8:  # 0 = the stored training patch size
        p.error(f"--patch {args.patch}: a window needs at least 8 pixels (0 or unset: the training patch size)")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.gate_threshold is not None and not 0 <= args.gate_threshold < 1:
        p.error(f"--gate-threshold {args.gate_threshold}: must be in [0, 1), as evaluate.gate_threshold")
    if args.model and (args.no_gate or args.gate_threshold is not None or args.checkpoint):
        p.error(
            "--no-gate, --gate-threshold and --checkpoint apply to --run; an exported model has its gate "
            "and checkpoint fixed by mlps export (export again to change them)"
        )
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from mlps_dist.deploy.infer import infer

    count, rank = infer(args)
    if rank == 0:
        print(f"wrote {count} predictions to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
