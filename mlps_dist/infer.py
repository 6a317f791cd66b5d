"""Segment any folder of H&E images with a trained run: class-index PNGs and colour overlays.

    python -m mlps_dist.infer --run runs/luad --input slides/patches --out predictions/
    python -m mlps_dist.infer --run runs/luad --input a.png b.png --out predictions/ --no-gate
    torchrun --standalone --nproc_per_node=4 -m mlps_dist.infer --run-dir runs/luad --input big/ --out pred/

(Under torchrun spell it ``--run-dir``: torchrun reads a bare ``--run`` as its own ``--run-path``.)

Model, classes and normalisation come from RUN/config.yaml and the model files in the run.
Files are split over ranks (each file exactly once). For every input ``REL/NAME.ext``
(relative to the input folder, or the file name for explicit files) two files are written:

    OUT/REL/NAME.png          palettised 8-bit PNG of class indices 0..C-1 (the dataset palette)
    OUT/REL/NAME_overlay.png  the image blended with the class colours

Images of any size: one up to the training patch size is segmented in one pass; a larger
one with sliding windows of the patch size (``--overlap`` of each window shared with its
neighbour, last window flush with the border), logits averaged where windows overlap. The
classification gate (``evaluate.gate_threshold``) is applied per window: a class stays
possible at a pixel when the classifier allows it in any window covering that pixel.

Colour modes: RGBA is composited onto white (transparent = empty glass, which is white
in H&E); greyscale, palette and 16-bit images are converted to RGB. A file that cannot be
read as an image stops the run with an error naming it, before any segmentation starts.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mlps_dist import dist
from mlps_dist.checkpoint import CheckpointError
from mlps_dist.errors import MlpsError
from mlps_dist.config import ConfigError, load_config
from mlps_dist.gate import allowed_classes, apply_gate, class_probabilities, load_classifier, load_segmenter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def list_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(file, output path stem relative to OUT) for every image, sorted, names unique."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(f, f.relative_to(path).with_suffix("")) for f in files]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not found:
        raise FileNotFoundError(f"--input {' '.join(inputs)}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    names: dict[Path, Path] = {}
    for file, rel in found:
        if rel in names:
            raise ValueError(f"{file} and {names[rel]} would both be written as {rel}.png; "
                             f"pass their folder instead of single files, or rename one")
        names[rel] = file
    return found


def load_rgb(path: Path) -> np.ndarray:
    """H x W x 3 uint8; see the module docstring for how other colour modes are converted."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            elif img.mode.startswith("I;16") or img.mode == "I":
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(arr / max(arr.max(), 1) * 255, 0, 255).astype(np.uint8))
            return np.array(img.convert("RGB"))  # a writable copy for torch.from_numpy
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as an image ({exc}); remove it from --input or re-export it") from exc


def check_readable(files: list[Path]) -> None:
    """Open every header before starting, so a bad file fails the run early."""
    for path in files:
        try:
            with Image.open(path) as img:
                img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: cannot be read as an image ({exc}); remove it from --input or re-export it") from exc


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Starts of windows covering ``range(length)``; the last one flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(round(window * (1 - overlap))))
    count = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


class Segmenter:
    """Sliding-window segmentation with the optional gate, for one image at a time."""

    def __init__(self, segmenter, classifier, mean, std, patch: int, overlap: float,
                 gate_threshold: float, batch_size: int, device):
        self.segmenter, self.classifier = segmenter, classifier
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.patch, self.overlap, self.threshold = patch, overlap, gate_threshold
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        image = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float() / 255
        image = (image - self.mean) / self.std
        boxes = [(y, x, min(self.patch, h), min(self.patch, w))
                 for y in window_starts(h, self.patch, self.overlap) for x in window_starts(w, self.patch, self.overlap)]
        logit_sum = count = allowed_any = None
        for first in range(0, len(boxes), self.batch_size):
            chunk = boxes[first:first + self.batch_size]
            crops = torch.cat([image[:, :, y:y + wh, x:x + ww] for y, x, wh, ww in chunk])
            logits = self.segmenter(crops).float()
            if logit_sum is None:
                c = logits.shape[1]
                logit_sum = torch.zeros(c, h, w, device=self.device)
                count = torch.zeros(1, h, w, device=self.device)
                allowed_any = torch.zeros(c, h, w, dtype=torch.bool, device=self.device)
            allowed = (allowed_classes(class_probabilities(self.classifier, crops), self.threshold)
                       if self.classifier is not None else None)
            for i, (y, x, wh, ww) in enumerate(chunk):
                logit_sum[:, y:y + wh, x:x + ww] += logits[i]
                count[:, y:y + wh, x:x + ww] += 1
                if allowed is not None:
                    allowed_any[:, y:y + wh, x:x + ww] |= allowed[i][:, None, None]
        logits = (logit_sum / count)[None]
        if self.classifier is not None:
            logits = apply_gate(logits, allowed_any[None])
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def palette_for(num_classes: int, info: dict | None) -> list[tuple[int, int, int]]:
    """C + 1 colours: the dataset palette (last = ignore/white) or stable generated ones."""
    if info and len(info.get("palette", [])) >= num_classes:
        colours = [tuple(int(v) for v in c) for c in info["palette"][:num_classes + 1]]
    else:
        rng = np.random.default_rng(num_classes)
        colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]
    return colours + [(255, 255, 255)] * (num_classes + 1 - len(colours))


def colourise(indices: np.ndarray, palette) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; indices beyond the palette drawn black."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = np.asarray(palette, np.uint8)
    return table[np.asarray(indices).astype(np.uint8)]


def blend(rgb: np.ndarray, indices: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    return (rgb * (1 - alpha) + colourise(indices, palette) * alpha).round().astype(np.uint8)


def overlay_row(rgb, masks, palette) -> np.ndarray:
    """The image followed by one overlay per mask, side by side (H, W*(1+len(masks)), 3).
    Accepts (3,H,W) or (H,W,3) images and torch tensors or arrays."""
    rgb = np.asarray(rgb.cpu() if torch.is_tensor(rgb) else rgb)
    if rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = rgb.transpose(1, 2, 0)
    panels = [rgb.astype(np.uint8)]
    for mask in masks:
        panels.append(blend(rgb, np.asarray(mask.cpu() if torch.is_tensor(mask) else mask), palette))
    return np.concatenate(panels, axis=1)


def save_outputs(out_stem: Path, rgb: np.ndarray, pred: np.ndarray, palette) -> None:
    """Written as .tmp then renamed: a crash never leaves a half-written PNG behind."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(pred, mode="L").convert("P")
    flat = [v for colour in palette for v in colour]
    mask.putpalette(flat + [0] * (768 - len(flat)))
    overlay = Image.fromarray(blend(rgb, pred, palette))
    for image, path in ((mask, out_stem.parent / f"{out_stem.name}.png"),
                        (overlay, out_stem.parent / f"{out_stem.name}_overlay.png")):
        tmp = path.with_name(path.name + ".tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # --run-dir as well: under torchrun a bare --run is taken as torchrun's own --run-path.
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory with config.yaml and segmenter/ (classifier/ for the gate)")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--no-gate", action="store_true", help="skip the classification gate")
    p.add_argument("--gate-threshold", type=float, default=None, help="default: evaluate.gate_threshold of the run")
    p.add_argument("--patch", type=int, default=0, help="window side; default: the training patch size")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of a window shared with its neighbour")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    args = p.parse_args(argv)
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    return args


def build(args) -> tuple[Segmenter, list]:
    config_path = Path(args.run) / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} does not exist; --run must be a run directory of a finished training")
    cfg = load_config(config_path)
    device = dist.device()
    segmenter, meta = load_segmenter(args.run, args.checkpoint, device=device)
    classifier = None if args.no_gate else load_classifier(args.run, int(meta["num_classes"]), device,
                                                           checkpoint=cfg.classifier.checkpoint)[0]
    info = None
    try:
        from mlps_dist.data.shards import read_info

        info = read_info(cfg.data.root)
    except (OSError, ValueError):
        pass  # shards not reachable from here: fall back to generated colours and 224 px
    patch = args.patch or cfg.data.image_size or (info or {}).get("splits", {}).get("train", {}).get("image_size", [224])[0]
    threshold = cfg.evaluate.gate_threshold if args.gate_threshold is None else args.gate_threshold
    model = Segmenter(segmenter, classifier, cfg.data.mean, cfg.data.std, int(patch), args.overlap,
                      threshold, args.batch_size, device)
    return model, palette_for(int(meta["num_classes"]), info)


def run(args) -> int:
    files = list_inputs(args.input)
    mine = [files[i] for i in dist.partition(len(files), dist.get_world_size(), dist.get_rank())]
    check_readable([f for f, _ in mine])
    model, palette = build(args)
    for file, rel in mine:
        rgb = load_rgb(file)
        save_outputs(Path(args.out) / rel, rgb, model(rgb), palette)
    dist.barrier()
    return len(files)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist.init("auto")
    try:
        count = run(args)
        if dist.is_main():
            print(f"wrote {count} predictions to {args.out}")
        return 0
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, MlpsError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # every rank: each names its own bad files
        return 2
    finally:
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
