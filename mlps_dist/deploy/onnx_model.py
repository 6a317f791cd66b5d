"""An exported model (mlps export) run with onnxruntime: no torch, no training stack.

Needs only ``onnxruntime``, ``numpy`` and ``pillow`` (``pip install mlps-dist[deploy]``).
The export folder holds ``model.onnx`` and ``model.json`` (classes, palette, training MPP
and patch size, gate threshold, normalisation, metrics, digests) side by side.

    model = OnnxModel("export/model.onnx")
    out = model(tiles)          # tiles: uint8 RGB (N, 3, H, W) numpy
    out["classes"]              # (N, H, W) int64 class index per pixel (gated)
    out["scores"]               # (N, C, H, W) float32 softmax after the gate
    out["presence"]             # (N, C) float32 the gate classifier's probabilities
    model.scores(tiles)         # just the scores (N, C, H, W) float32

The model interface shared with the slide tools and ``infer``:

    scores(tiles uint8 (N, 3, H, W)) -> float32 (N, C, H, W)
    classes       list of C class names        num_classes   C
    palette       C + 1 RGB colours (last: ignore / background white)
    ignore_index  mask value of unlabelled pixels
    mpp           microns per pixel of the training patches (None when unknown)
    patch_size    side of the training patches in pixels (the window size for large images)

Input contract of the graph: ``image`` uint8 RGB, (N, 3, H, W) with any N, H, W, at the
training MPP. A patch of ``patch_size`` is predicted exactly as evaluation predicts it;
larger images are tiled by the caller (mlps_dist.deploy.windows). A run trained with stain
normalisation (model.json ``stain``) has it applied here, in numpy, before the graph. Other
dtypes or channel counts are refused here with an InputError before onnxruntime sees them.

Execution providers: CUDA when onnxruntime offers it, else CPU (``providers=`` overrides).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlps_dist.core.errors import InputError
from mlps_dist.core.stain_match import create_stain

OUTPUTS = ("classes", "scores", "presence")


def model_json_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_name("model.json")


def default_providers(available: list[str]) -> list[str]:
    """CUDA first when this onnxruntime build offers it; CPU always as the fallback."""
    wanted = [p for p in ("CUDAExecutionProvider",) if p in available]
    return wanted + ["CPUExecutionProvider"]


def check_tiles(tiles) -> np.ndarray:
    """The graph's input contract, checked with a message that says what to change."""
    if not isinstance(tiles, np.ndarray):
        raise InputError(f"image: expected a numpy array, got {type(tiles).__name__}")
    if tiles.dtype != np.uint8:
        raise InputError(
            f"image: expected uint8 RGB values 0..255, got dtype {tiles.dtype}; convert with "
            f"np.clip(x, 0, 255).astype(np.uint8) (do not normalise: the model does that)"
        )
    if tiles.ndim != 4 or tiles.shape[1] != 3:
        raise InputError(
            f"image: expected shape (N, 3, H, W) with 3 RGB channels, got {tuple(tiles.shape)}; "
            f"drop alpha (composite on white) and put channels first"
        )
    if 0 in tiles.shape:
        raise InputError(f"image: empty input of shape {tuple(tiles.shape)}")
    return np.ascontiguousarray(tiles)


REQUIRED = {"classes": list, "palette": list, "ignore_index": int, "patch_size": int}


def record_digest(meta: dict) -> str:
    """sha256 of model.json's content without its own ``digest`` key (written by the export)."""
    import hashlib

    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_meta(meta, meta_path: Path, onnx_path: Path) -> None:
    """model.json has the keys the model needs, and describes this very model.onnx (the
    sha256 that mlps export recorded): a json from another export, or one left beside
    a newer graph by a killed export, is refused instead of used."""
    from mlps_dist.core.fileio import sha256_file

    if not isinstance(meta, dict):
        raise InputError(
            f"{meta_path}: expected a JSON object written by mlps export, got "
            f"{type(meta).__name__}; export the model again"
        )
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise InputError(f"{meta_path}: key '{key}' is missing or not a {kind.__name__}; export the model again")
    if len(meta["palette"]) < len(meta["classes"]) or not meta["classes"] or meta["patch_size"] < 8:
        raise InputError(
            f"{meta_path}: needs at least one class, a colour per class and patch_size >= 8; export the model again"
        )
    if meta.get("digest") and meta["digest"] != record_digest(meta):
        raise InputError(
            f"{meta_path} was changed after mlps export wrote it (its digest no longer matches "
            f"its content); export the model again rather than editing it"
        )
    recorded = ((meta.get("weights") or {}).get("model.onnx") or {}).get("sha256")
    if recorded and recorded != sha256_file(onnx_path):
        raise InputError(
            f"{meta_path} does not describe {onnx_path} (its sha256 differs from the one recorded): "
            f"the two files come from different exports; export the model again"
        )


class OnnxModel:
    """model.onnx + model.json of an export, run with onnxruntime."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InputError(
                f"an exported model runs with onnxruntime, which is not installed ({exc}): "
                f"pip install onnxruntime (or onnxruntime-gpu)"
            ) from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path} does not exist; --model must be the model.onnx written by mlps export")
        meta_path = model_json_path(self.path)
        if not meta_path.is_file():
            raise InputError(
                f"{meta_path} does not exist; keep model.json next to model.onnx (both come from mlps export)"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise InputError(f"{meta_path}: not valid JSON ({exc}); export the model again") from exc
        check_meta(self.meta, meta_path, self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or default_providers(ort.get_available_providers())
            )
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise InputError(f"{self.path}: onnxruntime cannot load it ({exc}); export the model again") from exc
        self.classes: list[str] = list(self.meta["classes"])
        self.num_classes = len(self.classes)
        self.palette = [tuple(int(v) for v in c) for c in self.meta["palette"]]
        self.ignore_index = int(self.meta["ignore_index"])
        self.mpp = self.meta.get("mpp")
        self.patch_size = int(self.meta["patch_size"])
        self.image_size = int(self.meta.get("image_size") or 0)
        self.gate_threshold = self.meta.get("gate_threshold")
        # data.stain of the run: applied here, before the graph (a per-image estimate needs an
        # eigen-decomposition and percentiles, od_match's estimate a whole set of images, which
        # one ONNX call on a batch of tiles does not see)
        self.stain = create_stain(self.meta.get("stain"))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _input(self, tiles: np.ndarray, stain: bool) -> np.ndarray:
        tiles = check_tiles(tiles)
        if stain and self.stain is not None:
            tiles = self.stain.tiles(tiles)
        return np.ascontiguousarray(tiles)

    def __call__(self, tiles: np.ndarray, stain: bool = True) -> dict[str, np.ndarray]:
        """``stain`` False: the tiles' stains were already normalised (a whole image at once)."""
        outputs = self.session.run(list(OUTPUTS), {"image": self._input(tiles, stain)})
        return dict(zip(OUTPUTS, outputs))

    def scores(self, tiles: np.ndarray, stain: bool = True) -> np.ndarray:
        """(N, C, H, W) float32 softmax after the gate."""
        return self.session.run(["scores"], {"image": self._input(tiles, stain)})[0]
