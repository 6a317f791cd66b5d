"""Convert MXNet ResNet-38 (A1) ImageNet weights to a ResNet-38d state dict.

    python tools/convert_weights.py --mxnet ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --out resnet38d_imagenet.pth

Reads the .params file without mxnet, renames every tensor to our ResNet-38d names, drops
the 1000-class fc, checks the result by loading it into the network (printing the missing /
unexpected report) and writes a plain state dict for ``classifier.pretrained``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlps_dist.models.resnet38d import create_resnet38d, create_small38  # noqa: E402
from mlps_dist.models.weights import (  # noqa: E402
    LoadReport, convert_mxnet_resnet38d, match_state_dict, read_mxnet_params)

BACKBONES = {"resnet38d": create_resnet38d, "small38": create_small38}


def check_against_model(state: dict[str, torch.Tensor], dropped: list[str], model_name: str,
                        source: str) -> LoadReport:
    """Match ``state`` against the backbone's names and shapes (built on the meta device:
    no memory for a 100 M-parameter network)."""
    with torch.device("meta"):
        own = BACKBONES[model_name]().state_dict()
    try:
        return match_state_dict(own, state, source, dropped)
    except ValueError as exc:
        raise SystemExit(f"{exc} (checked against --model {model_name})") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mxnet", required=True, help="MXNet .params file (mx.nd.save format)")
    parser.add_argument("--out", required=True, help="output .pth (plain state dict)")
    parser.add_argument("--model", default="resnet38d", choices=sorted(BACKBONES),
                        help="network whose names and shapes the result must fit")
    args = parser.parse_args(argv)

    state, dropped = convert_mxnet_resnet38d(read_mxnet_params(args.mxnet))
    report = check_against_model(state, dropped, args.model, args.mxnet)
    print(report.summary())
    out = Path(args.out)
    from mlps_dist.checkpoint import atomic_torch_save

    atomic_torch_save(state, out)  # a reader never sees a half-written file
    print(f"wrote {out} ({len(state)} tensors)")
    return 1 if report.missing else 0


if __name__ == "__main__":
    sys.exit(main())
