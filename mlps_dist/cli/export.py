"""``mlps export``: a trained run -> model.onnx + model.json + MODEL_CARD.md, self-checked
against torch before model.onnx appears (mlps_dist/predict/export.py).

    mlps export --run runs/luad --out export/luad [--opset 17] [--checkpoint best|last]
"""

from __future__ import annotations

from mlps_dist.cli import parser

HELP = "export a trained run to ONNX (gate inside), checked against torch on the test patches"
EPILOG = """\
The export checks itself before model.onnx appears: onnxruntime against the torch model on the
run's --check-split patches; the class maps must agree on at least 99.9 % of pixels. Below that
the command fails (exit status 1) and writes no model.onnx. mlps infer --model and
mlps segment --model run the export without torch (pip install mlps-dist[deploy])."""


def build_parser():
    p = parser("export", HELP, EPILOG)
    p.add_argument("--run", required=True, help="run directory (config.yaml, segmenter/, classifier/)")
    p.add_argument("--out", required=True, help="folder for model.onnx, model.json, MODEL_CARD.md")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="segmenter checkpoint exported")
    p.add_argument("--check-split", default="test", help="shard split whose patches the self-check runs on")
    p.add_argument("--check-limit", type=int, default=0, help="at most this many patches in the self-check (0: all)")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # --help without loading torch
    from pathlib import Path

    from mlps_dist.predict.export import export

    record = export(args)
    print(
        f"wrote {Path(args.out) / 'model.onnx'} ({record['num_classes']} classes, gate "
        f"{'off' if not record['gate'] else record['gate_threshold']}) and model.json, MODEL_CARD.md"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.core import runner

    return runner.run(_main, argv)
