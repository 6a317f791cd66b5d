"""Segment any folder of H&E images with a trained run or an exported model: class-index PNGs and overlays.

    python -m mlps_dist.infer --run runs/luad --input slides/patches --out predictions/
    python -m mlps_dist.infer --run runs/luad --input a.png b.png --out predictions/ --no-gate
    python -m mlps_dist.infer --model export/model.onnx --input slides/patches --out predictions/
    torchrun --standalone --nproc_per_node=4 -m mlps_dist.infer --run-dir runs/luad --input big/ --out pred/

(Under torchrun spell it ``--run-dir``: torchrun reads a bare ``--run`` as its own ``--run-path``.)

Two backends behind one interface (``segment(rgb, window, overlap, batch_size)``):

- ``--run RUN``: the torch models of a finished run (RUN/config.yaml and the model files);
  files are split over ranks under torchrun (each file exactly once).
- ``--model DIR/model.onnx``: an export of tools/export.py, run with onnxruntime (CUDA
  execution provider where present, else CPU) in one process. Needs only onnxruntime,
  numpy and pillow (``pip install mlps-dist[deploy]``): nothing on this path imports torch.
  The gate, its threshold and the checkpoint are fixed in the export.

For every input ``REL/NAME.ext`` (relative to the input folder, or the file name for
explicit files) two files are written:

    OUT/REL/NAME.png          palettised 8-bit PNG of class indices 0..C-1 (the dataset palette)
    OUT/REL/NAME_overlay.png  the image blended with the class colours

Images of any size, in bounded memory (about 20 bytes per pixel: the image, its class map
and overlay; the float scores are held for a band of rows only, windows.segment_image):
windows of the training patch size (as stored in the run's shards or
the export's model.json; ``--patch`` overrides it) with ``--overlap`` of each window shared
with its neighbour, the last window flush with the border. Each window is predicted exactly
as evaluation predicts a patch (resized to ``data.image_size``, segmenter and gate, back at
the window's size); the gated scores are averaged where windows overlap (mlps_dist.windows),
the same rule for both backends, so they agree up to float rounding.

Colour modes: RGBA is composited onto white (transparent = empty glass, which is white
in H&E); greyscale, palette and 16-bit images are converted to RGB (16-bit scaled by
65535, so tiles of one scan keep one scale). A file that cannot be read as an image stops
the run with an error naming it, before any segmentation starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlps_dist import runner
from mlps_dist.draw import blend, palette_for, palette_png_bytes, png_bytes
from mlps_dist.errors import InputError, MlpsError
from mlps_dist.fileio import atomic_write_bytes
from mlps_dist.windows import segment_image

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


def too_large(path: Path, exc: Exception) -> ValueError:
    limit = Image.MAX_IMAGE_PIXELS or 0
    return ValueError(f"{path}: {exc.__class__.__name__}: the image has more than --max-megapixels "
                      f"{limit / 1e6:g} million pixels (about 20 bytes per pixel of memory are needed); pass a "
                      f"larger --max-megapixels if it is a genuine image, or segment whole slides with "
                      f"mlps_dist.segment_slides")


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
                arr = np.asarray(img, dtype=np.float64)  # by the bit depth, not the image's own maximum:
                full = 65535.0 if arr.max() <= 65535 else arr.max()  # tiles of one slide keep one scale
                img = Image.fromarray(np.clip(arr / full * 255, 0, 255).round().astype(np.uint8))
            return np.array(img.convert("RGB"))  # a writable copy for torch.from_numpy
    except Image.DecompressionBombError as exc:
        raise too_large(path, exc) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as an image ({exc}); remove it from --input or re-export it") from exc


def check_readable(files: list[Path]) -> None:
    """Open every header before starting, so a bad file fails the run early."""
    for path in files:
        try:
            with Image.open(path) as img:
                width, height = img.size
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{width} x {height} px")
        except Image.DecompressionBombError as exc:
            raise too_large(path, exc) from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{path}: cannot be read as an image ({exc}); remove it from --input or re-export it") from exc


def overlay(rgb: np.ndarray, pred: np.ndarray, palette, band: int = 256) -> np.ndarray:
    """draw.blend of the image and its classes, computed in row bands (its float temporaries
    would take ~70 bytes per pixel of a large image at once)."""
    out = np.empty_like(rgb)
    for top in range(0, rgb.shape[0], band):
        out[top:top + band] = blend(rgb[top:top + band], pred[top:top + band], palette)
    return out


def save_outputs(out_stem: Path, rgb: np.ndarray, pred: np.ndarray, palette) -> None:
    """Class-index PNG and overlay, each written atomically; when the overlay cannot be written
    (a full disk) the class PNG is removed too: an image has both outputs or neither."""
    classes = out_stem.parent / f"{out_stem.name}.png"
    atomic_write_bytes(classes, palette_png_bytes(pred, palette))
    try:
        atomic_write_bytes(out_stem.parent / f"{out_stem.name}_overlay.png", png_bytes(overlay(rgb, pred, palette)))
    except BaseException:
        classes.unlink(missing_ok=True)
        raise


class RunModel:
    """Torch backend: the predictor of a run, windows blended by predict.sliding_window."""

    def __init__(self, args):
        from mlps_dist import dist
        from mlps_dist.config import ConfigError, load_config
        from mlps_dist.predict import create_predictor, training_patch_size

        config_path = Path(args.run) / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"{config_path} does not exist; --run must be a run directory of a finished training")
        cfg = load_config(config_path)
        self.predictor, meta = create_predictor(args.run, cfg, checkpoint=args.checkpoint or "best",
                                                gate=not args.no_gate, gate_threshold=args.gate_threshold,
                                                device=dist.device())
        info = None
        try:
            from mlps_dist.data.shards import read_info

            info = read_info(cfg.data.root)
        except (OSError, ValueError):
            pass  # shards not reachable from here: generated colours, data.image_size windows
        self.patch_size = training_patch_size(cfg, info)
        self.palette = palette_for(int(meta["num_classes"]), info)

    def segment(self, rgb: np.ndarray, window: int, overlap: float, batch_size: int) -> np.ndarray:
        """predict.sliding_window's rule, blended in row bands (windows.segment_image): memory
        set by the window and the image's width, not its area."""
        import torch

        if self.predictor.stain is not None:  # once over the whole image, as sliding_window does
            rgb = self.predictor.stain(rgb)

        @torch.no_grad()
        def scores(tiles: np.ndarray) -> np.ndarray:
            return self.predictor(torch.from_numpy(tiles), stain=False).scores().float().cpu().numpy()

        return segment_image(scores, rgb, window, overlap, batch_size)


class ExportedModel:
    """ONNX backend: deploy.OnnxModel, windows blended by windows.segment_image (numpy)."""

    def __init__(self, args):
        from mlps_dist.deploy import OnnxModel

        self.model = OnnxModel(args.model)
        self.patch_size, self.palette = self.model.patch_size, self.model.palette

    def segment(self, rgb: np.ndarray, window: int, overlap: float, batch_size: int) -> np.ndarray:
        # stains normalised once over the whole image, as predict.sliding_window does
        rgb = self.model.normalise_stains(rgb)
        return segment_image(lambda tiles: self.model.scores(tiles, stain=False), rgb, window, overlap, batch_size)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # --run-dir as well: under torchrun a bare --run is taken as torchrun's own --run-path.
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", "--run-dir", dest="run",
                        help="run directory with config.yaml and segmenter/ (classifier/ for the gate)")
    source.add_argument("--model", help="model.onnx written by tools/export.py (model.json next to it)")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default=None, help="--run only; default best")
    p.add_argument("--no-gate", action="store_true", help="--run only: skip the classification gate")
    p.add_argument("--gate-threshold", type=float, default=None, help="default: evaluate.gate_threshold of the run")
    p.add_argument("--patch", type=int, default=0, help="window side; default: the stored training patch size")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of a window shared with its neighbour")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out not made by infer")
    p.add_argument("--max-megapixels", type=float, default=Image.MAX_IMAGE_PIXELS / 1e6,
                   help="refuse larger images (default: Pillow's decompression-bomb limit, "
                        f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f})")
    args = p.parse_args(argv)
    if not 0 < args.max_megapixels < float("inf"):
        p.error(f"--max-megapixels {args.max_megapixels}: must be a finite number > 0")
    if not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if args.patch and args.patch < 8:  # 0 = the stored training patch size
        p.error(f"--patch {args.patch}: a window needs at least 8 pixels (0 or unset: the training patch size)")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.gate_threshold is not None and not 0 <= args.gate_threshold < 1:
        p.error(f"--gate-threshold {args.gate_threshold}: must be in [0, 1), as evaluate.gate_threshold")
    if args.model and (args.no_gate or args.gate_threshold is not None or args.checkpoint):
        p.error("--no-gate, --gate-threshold and --checkpoint apply to --run; an exported model has its gate "
                "and checkpoint fixed by tools/export.py (export again to change them)")
    return args


def run(args, rank: int = 0, world: int = 1, group=None) -> int:
    """The inputs are listed first (a missing --input creates no --out); then --out is checked
    against them, claimed and locked (mlps_dist/toolout.py) for the run."""
    from mlps_dist.toolout import tool_output

    Image.MAX_IMAGE_PIXELS = int(args.max_megapixels * 1e6)
    files = list_inputs(args.input)
    with tool_output(args.out, args.input, "infer", group, force=args.force):
        return _run(args, files, rank, world)


def _run(args, files, rank: int, world: int) -> int:
    mine = files[rank::world]  # every file on exactly one rank
    check_readable([f for f, _ in mine])
    model = ExportedModel(args) if args.model else RunModel(args)
    window = int(args.patch or model.patch_size)
    for file, rel in mine:
        rgb = load_rgb(file)
        pred = model.segment(rgb, window, args.overlap, args.batch_size)
        save_outputs(Path(args.out) / rel, rgb, pred.astype(np.uint8), model.palette)
    return len(files)


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.model:  # one process, no torch
            count, rank = run(args), 0
        else:
            from mlps_dist import dist

            dist.init("auto")
            try:
                rank = dist.get_rank()
                count = run(args, rank, dist.get_world_size(), group=dist)
                dist.barrier()
            finally:
                dist.teardown()
        if rank == 0:
            print(f"wrote {count} predictions to {args.out}")
        return 0
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, MlpsError):
            raise
        raise InputError(str(exc)) from exc  # each rank names its own bad files


def main(argv: list[str] | None = None) -> int:
    return runner.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
