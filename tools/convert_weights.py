"""Convert MXNet ResNet-38 (A1) ImageNet weights to a ResNet-38d state dict, or check and
extract a pytorch-deeplab-xception checkpoint for the stage-3 DeepLab.

    python tools/convert_weights.py --mxnet ilsvrc-cls_rna-a1_cls1000_ep-0001.params \
        --out resnet38d_imagenet.pth
    python tools/convert_weights.py --deeplab deeplab-resnet.pth.tar --out deeplab_resnet101_voc.pth

--mxnet reads the .params file without mxnet, renames every tensor to our ResNet-38d names,
drops the 1000-class fc and writes a plain state dict for ``classifier.pretrained``.
--deeplab reads the checkpoint ({'state_dict', 'optimizer', 'epoch', 'best_pred'}), drops
its 1x1 classifier (decoder.last_conv.8) and writes the rest for ``segmenter.pretrained``
(which also takes the .pth.tar itself). Both check the result against the network's names
and shapes, print every missing / unexpected name, and exit 1 when there is any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlps_dist.models import create_segmenter  # noqa: E402
from mlps_dist.models.resnet38d import create_resnet38d, create_small38  # noqa: E402
from mlps_dist.models.weights import (  # noqa: E402
    LoadReport, convert_mxnet_resnet38d, match_state_dict, read_mxnet_params, read_state_dict)

BACKBONES = {"resnet38d": create_resnet38d, "small38": create_small38,
             "deeplabv3plus_resnet101": lambda: create_segmenter("deeplabv3plus_resnet101", 21),
             "deeplabv3plus_small": lambda: create_segmenter("deeplabv3plus_small", 21)}
CLASSIFIER = "decoder.last_conv.8."


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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mxnet", help="MXNet .params file (mx.nd.save format) of ResNet-38 (A1)")
    source.add_argument("--deeplab", help="pytorch-deeplab-xception checkpoint, e.g. deeplab-resnet.pth.tar")
    parser.add_argument("--out", required=True, help="output .pth (plain state dict)")
    parser.add_argument("--model", default=None, choices=sorted(BACKBONES),
                        help="network whose names and shapes the result must fit "
                             "(default: resnet38d for --mxnet, deeplabv3plus_resnet101 for --deeplab)")
    args = parser.parse_args(argv)

    if args.mxnet:
        src, model = args.mxnet, args.model or "resnet38d"
        state, dropped = convert_mxnet_resnet38d(read_mxnet_params(src))
        report = check_against_model(state, dropped, model, src)
        missing = report.missing
    else:
        src, model = args.deeplab, args.model or "deeplabv3plus_resnet101"
        state, dropped = read_state_dict(src, kind="deeplab")
        report = check_against_model(state, dropped, model, src)
        missing = [k for k in report.missing if not k.startswith(CLASSIFIER)]  # trained per dataset anyway
    print(report.summary())
    out = Path(args.out)
    from mlps_dist.train.checkpoint import atomic_torch_save

    atomic_torch_save(state, out)  # a reader never sees a half-written file
    print(f"wrote {out} ({len(state)} tensors)")
    return 1 if missing or (args.deeplab and report.unexpected) else 0


if __name__ == "__main__":
    sys.exit(main())
