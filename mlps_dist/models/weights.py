"""Pretrained weights: MXNet ``.params`` reading (no mxnet needed), ResNet-38d name
conversion, and loading into a backbone with a missing/unexpected-key report.

MXNet's NDArray-list file (``mx.nd.save``), little-endian:
    uint64 0x112 (list magic), uint64 reserved,
    uint64 n, then n NDArrays, then uint64 m (0 or n) names, each uint64 length + bytes.
One NDArray, by its leading uint32:
    0xF993FACA (V3) / 0xF993FAC9 (V2): int32 storage type (0 = dense),
        shape = int32 ndim + ndim int64 (V3: ndim -1 = unknown -> empty array)
    0xF993FAC8 (V1): shape = uint32 ndim + ndim int64
    anything else (legacy): that word is ndim, then ndim uint32
    then (unless the shape is empty) int32 dev_type, int32 dev_id, int32 dtype flag,
    then the raw C-order data.
Names carry "arg:" (parameters) or "aux:" (BN running statistics) prefixes.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
# mshadow type flags
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take_all(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated MXNet .params file (ends at byte {len(self.data)})")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def take(self, fmt: str):
        values = self.take_all(fmt)
        return values if len(values) > 1 else values[0]

    def take_array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * np.dtype(dtype).itemsize
        if self.pos + nbytes > len(self.data):
            raise ValueError(f"{self.path}: truncated MXNet .params file (array of shape {shape})")
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos).reshape(shape).copy()
        self.pos += nbytes
        return arr


def _read_ndarray(r: _Reader, i: int) -> np.ndarray | None:
    magic = r.take("<I")
    if magic in (V2_MAGIC, V3_MAGIC):
        storage = r.take("<i")
        if storage != 0:
            raise ValueError(
                f"{r.path}: array #{i} uses sparse storage type {storage}; only dense arrays are supported"
            )
        ndim = r.take("<i")
        if ndim < 0:  # V3 "unknown shape": an empty array
            return None
        shape = r.take_all(f"<{ndim}q") if ndim else ()
        if ndim == 0 and magic == V2_MAGIC:
            return None
    elif magic == V1_MAGIC:
        ndim = r.take("<I")
        shape = r.take_all(f"<{ndim}q") if ndim else ()
        if ndim == 0:
            return None
    else:  # legacy: the word just read is ndim, dims are uint32
        ndim = magic
        if ndim > 32:
            raise ValueError(f"{r.path}: array #{i} starts with 0x{magic:08x}, which is no NDArray header")
        shape = r.take_all(f"<{ndim}I") if ndim else ()
        if ndim == 0:
            return None
    r.take("<ii")  # device type and id: irrelevant once on disk
    flag = r.take("<i")
    if flag not in DTYPES:
        raise ValueError(f"{r.path}: array #{i} has unsupported dtype flag {flag}")
    return r.take_array(tuple(int(s) for s in shape), DTYPES[flag])


def read_mxnet_params(path: str | Path) -> dict[str, np.ndarray]:
    """{name (with its arg:/aux: prefix): array} of an ``mx.nd.save`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MXNet weights file {path} does not exist")
    r = _Reader(path.read_bytes(), path)
    magic, _reserved = r.take("<QQ")
    if magic != LIST_MAGIC:
        raise ValueError(f"{path}: not an MXNet NDArray list (magic 0x{magic:x}, expected 0x{LIST_MAGIC:x})")
    arrays = [_read_ndarray(r, i) for i in range(r.take("<Q"))]
    names = []
    for _ in range(r.take("<Q")):
        length = r.take("<Q")
        names.append(r.take_array((length,), np.uint8).tobytes().decode("utf-8"))
    if len(names) != len(arrays):
        raise ValueError(f"{path}: {len(arrays)} arrays but {len(names)} names; only named lists can be converted")
    return {n: a for n, a in zip(names, arrays) if a is not None}


# ---------------------------------------------------------------- ResNet-38d names

_BN_FIELD = {
    "gamma": "weight",
    "beta": "bias",
    "mean": "running_mean",
    "moving_mean": "running_mean",
    "var": "running_var",
    "moving_var": "running_var",
}
# res4b5_branch2b1_weight / bn4b5_branch2b1_moving_mean: stage 4, unit "b5", branch 2b1
_BLOCK = re.compile(r"^(res|bn)(\d)([a-z])(\d*)_(branch\w+?)_(weight|gamma|beta|moving_mean|moving_var|mean|var)$")
_BN7 = re.compile(r"^bn7_(gamma|beta|moving_mean|moving_var|mean|var)$")


def mxnet_name_to_resnet38d(name: str) -> str | None:
    """Our parameter name for an MXNet ResNet-38 (A1) name, None for the 1000-class fc;
    raises on a name that fits no pattern (nothing is dropped silently).

    The unit naming follows the public converter: unit "a" is the stage's first block (b4),
    "b<k>" its k-th following block (b4_k)."""
    bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if bare.startswith("linear1000"):
        return None
    if bare == "conv1a_weight":
        return "conv1a.weight"
    if m := _BN7.match(bare):
        return f"bn7.{_BN_FIELD[m.group(1)]}"
    if m := _BLOCK.match(bare):
        kind, stage, unit, index, branch, leaf = m.groups()
        block = f"b{stage}" if unit == "a" and not index else f"b{stage}_{index}"
        if kind == "res":
            return f"{block}.conv_{branch}.weight"
        return f"{block}.bn_{branch}.{_BN_FIELD[leaf]}"
    raise ValueError(f"MXNet parameter '{name}' matches no ResNet-38d naming pattern")


def convert_mxnet_resnet38d(arrays: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict in our naming, MXNet names dropped because they are the ImageNet fc)."""
    state, dropped = {}, []
    for name, arr in arrays.items():
        ours = mxnet_name_to_resnet38d(name)
        if ours is None:
            dropped.append(name)
        else:
            state[ours] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return state, dropped


# ---------------------------------------------------------------- loading

# Prefixes added by wrappers (DDP, our classifier/segmenter) and keys of classifier heads
# that never belong to a backbone: the ImageNet fc (torchvision "fc.", MXNet-converted
# "linear1000") and the public MLPS stage-1 head ("fc8.").
_WRAPPER_PREFIXES = ("module.", "backbone.")
_HEAD_PREFIXES = {
    "resnet": ("fc.",),
    "resnet38d": ("fc8.", "fc.", "head.", "linear1000"),
    "deeplab": ("decoder.last_conv.8.",),
    "efficientnet": ("_fc.",),
    "efficientnet_encoder": ("_fc.", "_conv_head.", "_bn1."),
}  # DeepLab's encoder: no 1280-channel head
# A whole segmenter (pytorch-deeplab-xception layout) rather than a bare backbone.
_SEGMENTER_PREFIXES = ("backbone.", "aspp.", "decoder.")


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    dropped: list[str] = field(default_factory=list)  # classifier heads removed on purpose

    def summary(self) -> str:
        def few(keys: list[str]) -> str:  # every name: nothing unmatched goes unreported
            return ", ".join(keys) + (f" ({len(keys)} in all)" if len(keys) > 8 else "")

        lines = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        if self.dropped:
            lines.append(f"  dropped (classifier head): {few(self.dropped)}")
        if self.missing:
            lines.append(f"  missing (left at their initial values): {few(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {few(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A backbone state dict from ``path`` (.pth/.pt via weights_only, or MXNet .params for
    ResNet-38d) with wrapper prefixes removed; returns (state, dropped head keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist; fix the 'pretrained' key of the stage")
    if path.suffix == ".params":
        if kind != "resnet38d":
            raise ValueError(f"{path}: MXNet .params files hold ResNet-38d weights only, not '{kind}'")
        return convert_mxnet_resnet38d(read_mxnet_params(path))
    obj = _unwrap(_torch_load(path), path)
    state, dropped = {}, []
    wrappers = ("module.",) if kind == "deeplab" else _WRAPPER_PREFIXES
    for key, value in obj.items():
        for prefix in wrappers:
            key = key.removeprefix(prefix)
        if key.startswith(_HEAD_PREFIXES[kind]):
            dropped.append(key)
        else:
            state[key] = value
    return state, dropped


def _numpy_scalar_globals() -> list:
    """What ``torch.save`` of a numpy scalar needs: training scripts often store
    ``best_pred`` (a numpy float64 from np.nanmean) beside the weights."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    kinds = [
        getattr(np.dtypes, n)
        for n in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")
        if hasattr(np, "dtypes") and hasattr(np.dtypes, n)
    ]
    return [scalar, np.dtype, *kinds]


def _torch_load(path: Path):
    """weights_only loading (no code runs) that also accepts numpy scalars."""
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors carry no file name
        raise ValueError(f"{path}: not a loadable torch weights file ({exc})") from exc


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers ({'state_dict', 'optimizer', ...})
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def is_whole_segmenter(path: str | Path) -> bool:
    """True for a file holding a whole DeepLab (backbone., aspp., decoder. keys), False for
    a bare backbone (torchvision ImageNet ResNet)."""
    keys = [k.removeprefix("module.") for k in _unwrap(_torch_load(Path(path)), Path(path))]
    return any(k.startswith(_SEGMENTER_PREFIXES[1:]) for k in keys)


def match_state_dict(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, dropped: list[str] | None = None
) -> LoadReport:
    """Compare a file's tensors with a model's state dict (only names and shapes are read,
    so ``own`` may live on the meta device). Raises, naming ``source``, when no tensor
    matches or a matching name has a different shape: the wrong file for this model."""
    report = LoadReport(source, dropped=list(dropped or []))
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{source}: {len(mismatched)} tensors have the wrong shape for this model, e.g. "
            + "; ".join(mismatched[:5])
            + ". Is it the weights file of another network?"
        )
    report.loaded = [k for k in state if k in own]
    report.unexpected = [k for k in state if k not in own]
    # num_batches_tracked is a BN counter, absent from most published weight files
    report.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if not report.loaded:
        raise ValueError(
            f"{source}: no tensor name matches the model (file has e.g. {list(state)[:3]}, "
            f"model expects e.g. {list(own)[:3]}); pass weights for this network"
        )
    return report


def load_segmenter_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise a DeepLab from ``path``: a whole pytorch-deeplab-xception checkpoint
    (e.g. its VOC ``deeplab-resnet.pth.tar``: backbone, ASPP and decoder; the 21-class 1x1
    classifier is dropped) or an ImageNet ResNet file for the backbone alone."""
    if is_whole_segmenter(path):
        return load_pretrained(model, path, kind="deeplab")
    return load_pretrained(model.backbone, path, kind="resnet")


def load_pretrained(model: nn.Module, path: str | Path, kind: str) -> LoadReport:
    """Load ``path`` into ``model`` (a backbone) by name; log and return what matched.

    ``kind``: "resnet" (torchvision ImageNet ResNet), "resnet38d", or "deeplab" (a whole
    segmenter: ``model`` is the DeepLab, not its backbone). Errors as in
    ``match_state_dict``; missing and unexpected keys are logged, not fatal, as a partial
    backbone may be intended (e.g. the small CPU variants have no ImageNet weights).
    """
    if kind not in _HEAD_PREFIXES:
        raise ValueError(f"unknown weights kind '{kind}'; use one of {', '.join(_HEAD_PREFIXES)}")
    state, dropped = read_state_dict(path, kind)
    report = match_state_dict(model.state_dict(), state, str(path), dropped)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    if report.missing or report.unexpected:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    return report
