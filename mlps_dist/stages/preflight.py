"""Every check of a pipeline's config that can fail, before the first stage starts.

    python -m mlps_dist.stages.preflight --config FILE [key=value ...]     # exit 0, or 2 with the key

Config syntax and ranges are checked by ``mlps_dist.config``; this adds what needs the
models and the shards: model names, the CAM layers of the chosen classifier, class counts
and names against data.root, the splits every stage reads. A typo in ``masks.layers`` or
``segmenter.model`` is reported now, not hours later when that stage starts.
"""

from __future__ import annotations

import sys

from mlps_dist.config import Config, ConfigError


def check_models(cfg: Config) -> None:
    """Model names and CAM layers (every rank finds the same problem: rank 0 reports it)."""
    try:
        _check_models(cfg)
    except ConfigError as exc:
        exc.shared = True
        raise


def _check_models(cfg: Config) -> None:
    import torch

    from mlps_dist.models import CLASSIFIER_NAMES, SEGMENTER_NAMES, create_classifier

    if cfg.classifier.model not in CLASSIFIER_NAMES:
        raise ConfigError(f"'classifier.model' is '{cfg.classifier.model}'; use one of {', '.join(CLASSIFIER_NAMES)}")
    if cfg.segmenter.model not in SEGMENTER_NAMES:
        raise ConfigError(f"'segmenter.model' is '{cfg.segmenter.model}'; use one of {', '.join(SEGMENTER_NAMES)}")
    with torch.device("meta"):  # the layer names only: no memory, no weights
        layers = create_classifier(cfg.classifier.model, 2).cam_layers
    unknown = [layer for layer in cfg.masks.layers if layer not in layers]
    if unknown:
        raise ConfigError(f"'masks.layers' names {unknown}, which classifier '{cfg.classifier.model}' does not "
                          f"expose; choose from {list(layers)}")


def check_shards(cfg: Config) -> None:
    from mlps_dist.data.shards import read_info

    info = read_info(cfg.data.root)
    splits, classes = info.get("splits", {}), list(info.get("classes", []))
    for split in ("train", "val", *cfg.evaluate.splits):
        if split not in splits:
            raise ConfigError(f"{cfg.data.root}/info.json has no '{split}' split (it has {sorted(splits)}); "
                              f"rebuild the shards with it or fix data.root / evaluate.splits")
    for split in cfg.evaluate.splits:
        if not splits[split].get("has_masks"):
            raise ConfigError(f"'evaluate.splits' names '{split}', which has no ground-truth masks in {cfg.data.root}")
    for key, wanted in (("classifier.num_classes", cfg.classifier.num_classes),
                        ("segmenter.num_classes", cfg.segmenter.num_classes)):
        if wanted and wanted != len(classes):
            raise ConfigError(f"'{key}' = {wanted}, but {cfg.data.root}/info.json lists {len(classes)} classes "
                              f"{classes}; fix one of them (0 = take it from the data)")


def check(cfg: Config) -> None:
    check_models(cfg)
    check_shards(cfg)


def main(argv: list[str] | None = None) -> int:
    from mlps_dist.core import runner
    from mlps_dist.config import parse_cli

    def body(args):
        check(parse_cli(args, description="Check a pipeline config against the models and the shards."))
        return 0

    return runner.run(body, argv)


if __name__ == "__main__":
    sys.exit(main())
