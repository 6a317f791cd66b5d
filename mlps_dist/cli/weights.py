"""``mlps weights``: convert published weights for the networks' ``pretrained`` settings.

mlps weights --mxnet ilsvrc-cls_rna-a1_cls1000_ep-0001.params --out resnet38d_imagenet.pth
mlps weights --deeplab deeplab-resnet.pth.tar --out deeplab_resnet101_voc.pth
"""

from __future__ import annotations

from pathlib import Path

from mlps_dist.cli import parser as cli_parser

HELP = "convert published weights: MXNet ResNet-38 (A1) -> ResNet-38d, pytorch-deeplab-xception -> DeepLab"
EPILOG = """\
--mxnet reads the .params file without mxnet, renames every tensor to our ResNet-38d names,
drops the 1000-class fc and writes a plain state dict for ``classifier.pretrained``.
--deeplab reads the checkpoint ({'state_dict', 'optimizer', 'epoch', 'best_pred'}), drops
its 1x1 classifier (decoder.last_conv.8) and writes the rest for ``segmenter.pretrained``
(which also takes the .pth.tar itself). Both check the result against the network's names
and shapes, print every missing / unexpected name, and exit 1 when there is any."""
BACKBONES = ("deeplabv3plus_resnet101", "deeplabv3plus_small", "resnet38d", "small38")
CLASSIFIER = "decoder.last_conv.8."  # the DeepLab checkpoint's 1x1 classifier, trained per dataset


def create_backbone(name: str):
    from mlps_dist.models import create_segmenter
    from mlps_dist.models.resnet38d import create_resnet38d, create_small38

    if name.startswith("deeplabv3plus"):
        return create_segmenter(name, 21)  # the VOC head's 21 classes: the published checkpoints'
    return {"resnet38d": create_resnet38d, "small38": create_small38}[name]()


def check_against_model(state: dict, dropped: list[str], model_name: str, source: str):
    """Match ``state`` against the backbone's names and shapes (built on the meta device:
    no memory for a 100 M-parameter network)."""
    import torch

    from mlps_dist.models.weights import match_state_dict

    with torch.device("meta"):
        own = create_backbone(model_name).state_dict()
    try:
        return match_state_dict(own, state, source, dropped)
    except ValueError as exc:
        raise SystemExit(f"{exc} (checked against --model {model_name})") from exc


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("weights", HELP, EPILOG)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mxnet", help="MXNet .params file (mx.nd.save format) of ResNet-38 (A1)")
    source.add_argument("--deeplab", help="pytorch-deeplab-xception checkpoint, e.g. deeplab-resnet.pth.tar")
    parser.add_argument("--out", required=True, help="output .pth (plain state dict)")
    parser.add_argument(
        "--model",
        default=None,
        choices=BACKBONES,
        help="network whose names and shapes the result must fit "
        "(default: resnet38d for --mxnet, deeplabv3plus_resnet101 for --deeplab)",
    )
    args = parser.parse_args(argv)
    from mlps_dist.models.weights import convert_mxnet_resnet38d, read_mxnet_params, read_state_dict

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
