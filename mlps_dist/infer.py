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

Images of any size: windows of the training patch size (as stored in the run's shards;
``--patch`` overrides it) with ``--overlap`` of each window shared with its neighbour, the
last window flush with the border. Each window is predicted exactly as evaluation predicts
a patch (mlps_dist.predict: resized to ``data.image_size``, segmenter and gate, logits back
at the window's size); logits are averaged where windows overlap, and a class stays
possible at a pixel when the classifier allows it in any window covering that pixel.

Colour modes: RGBA is composited onto white (transparent = empty glass, which is white
in H&E); greyscale, palette and 16-bit images are converted to RGB. A file that cannot be
read as an image stops the run with an error naming it, before any segmentation starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mlps_dist import dist, runner
from mlps_dist.checkpoint import CheckpointError
from mlps_dist.config import ConfigError, load_config
from mlps_dist.draw import blend, palette_for, palette_png_bytes, png_bytes
from mlps_dist.errors import InputError, MlpsError
from mlps_dist.fileio import atomic_write_bytes
from mlps_dist.outdirs import check_not_overlapping, claim_output_dir
from mlps_dist.predict import Predictor, create_predictor, sliding_window, training_patch_size

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


def save_outputs(out_stem: Path, rgb: np.ndarray, pred: np.ndarray, palette) -> None:
    """Class-index PNG and overlay, each written atomically."""
    atomic_write_bytes(out_stem.parent / f"{out_stem.name}.png", palette_png_bytes(pred, palette))
    atomic_write_bytes(out_stem.parent / f"{out_stem.name}_overlay.png", png_bytes(blend(rgb, pred, palette)))


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
    p.add_argument("--patch", type=int, default=0, help="window side; default: the stored training patch size")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of a window shared with its neighbour")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by infer")
    args = p.parse_args(argv)
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    return args


def build(args) -> tuple[Predictor, int, list]:
    """(predictor, window side = the training patch size, palette)."""
    config_path = Path(args.run) / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} does not exist; --run must be a run directory of a finished training")
    cfg = load_config(config_path)
    predictor, meta = create_predictor(args.run, cfg, checkpoint=args.checkpoint, gate=not args.no_gate,
                                       gate_threshold=args.gate_threshold, device=dist.device())
    info = None
    try:
        from mlps_dist.data.shards import read_info

        info = read_info(cfg.data.root)
    except (OSError, ValueError):
        pass  # shards not reachable from here: generated colours, data.image_size windows
    window = args.patch or training_patch_size(cfg, info)
    return predictor, int(window), palette_for(int(meta["num_classes"]), info)


def run(args) -> int:
    if dist.is_main():  # before any work: never write into (or over) the inputs
        claim_output_dir(args.out, args.input, tool="infer", force=args.force)
    else:
        check_not_overlapping(Path(args.out), args.input)
    files = list_inputs(args.input)
    mine = [files[i] for i in dist.partition(len(files), dist.get_world_size(), dist.get_rank())]
    check_readable([f for f, _ in mine])
    predictor, window, palette = build(args)
    for file, rel in mine:
        rgb = load_rgb(file)
        pred = sliding_window(predictor, rgb, window, args.overlap, args.batch_size).classes()[0]
        save_outputs(Path(args.out) / rel, rgb, pred.to(torch.uint8).cpu().numpy(), palette)
    dist.barrier()
    return len(files)


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist.init("auto")
    try:
        count = run(args)
        if dist.is_main():
            print(f"wrote {count} predictions to {args.out}")
        return 0
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, MlpsError):
            raise
        raise InputError(str(exc)) from exc  # each rank names its own bad files
    finally:
        dist.teardown()


def main(argv: list[str] | None = None) -> int:
    return runner.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
