"""Segment any folder of H&E images with a trained run or an exported model: class-index PNGs and overlays.

    mlps infer --run runs/luad --input slides/patches --out predictions/
    mlps infer --run runs/luad --input a.png b.png --out predictions/ --no-gate
    mlps infer --model export/model.onnx --input slides/patches --out predictions/
    torchrun --standalone --nproc_per_node=4 -m mlps_dist -- infer --run runs/luad --input big/ --out pred/

(The flags are mlps_dist/cli/infer.py's; under torchrun the ``--`` keeps torchrun's own parser
from reading ``--run`` as its ``--run-path``.)

Two backends behind one interface (``tile_scores(tiles)`` and ``stain``):

- ``--run RUN``: the torch models of a finished run (RUN/config.yaml and the model files);
  files are split over ranks under torchrun (each file exactly once).
- ``--model DIR/model.onnx``: an export of ``mlps export``, run with onnxruntime (CUDA
  execution provider where present, else CPU) in one process. Needs only onnxruntime,
  numpy and pillow (``pip install mlps-dist[deploy]``): nothing on this path imports torch.
  The gate, its threshold and the checkpoint are fixed in the export.

For every input ``REL/NAME.ext`` (relative to the input folder, or the file name for
explicit files) two files are written:

    OUT/REL/NAME.png          palettised 8-bit PNG of class indices 0..C-1 (the dataset palette)
    OUT/REL/NAME_overlay.png  the image blended with the class colours

Images of any size. Windows of the training patch size (as stored in the run's shards or
the export's model.json; ``--patch`` overrides it) with ``--overlap`` of each window shared
with its neighbour, the last window flush with the border. Each window is predicted exactly
as evaluation predicts a patch (resized to ``data.image_size``, segmenter and gate, back at
the window's size); the gated scores are averaged where windows overlap (mlps_dist.deploy.windows),
the same rule for both backends, so they agree up to float rounding.

Memory. Images over ``--stream-megapixels`` (default 16) are streamed (``stream_image``):
read by row bands (mlps_dist.core.imagerows), blended band by band (windows.segment_bands) and
written by row bands (mlps_dist.core.pngstream), so memory is set by the window and the image's
width, not its height: 8000 x 8000 px with 500 px windows took 520 MB peak RSS (253 MB above
the interpreter and model, 4.2 bytes per pixel; 1101 MB whole) and 4000 x 4000 px 461 MB
(tools/bench_infer.py; docs/running.md has the table). PNGs (non-interlaced 8-bit, and 16-bit
grey) are read by rows, 8-bit grey/RGB(A) TIFFs by strips or rows of tiles (mlps_dist.core.tiffrows);
JPEG, BMP, WebP and other PNGs and TIFFs are decoded whole and their RGB (3 bytes per pixel)
is held while the rest streams. Smaller images take the whole-image path
(about 14-20 bytes per pixel: the image, its class map, overlay and PNG bytes). Both paths
write the same bytes (tests/test_infer_stream.py). With stain normalisation the streamed
path estimates the stains once from a grid sample of the whole image (every pixel up to 4 Mpx,
so then exactly the whole-image estimate) and applies them band by band.

Stains (runs with ``data.stain``): ``--stain-scope set`` (the default of ``od_match``) estimates
them once from a grid sample of up to 256 of all the inputs and maps every image with that one
estimate, so the output of an image depends on the set it came with: give one call the images of
one lab or scanner. ``--stain-scope image`` (the default of macenko and reinhard) estimates each
image on its own.

Colour modes: RGBA is composited onto white (transparent = empty glass, which is white
in H&E); greyscale, palette and 16-bit images are converted to RGB (16-bit scaled by
65535, so tiles of one scan keep one scale). A file that cannot be read as an image stops
the run with an error naming it, before any segmentation starts.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlps_dist.core import png
from mlps_dist.core.draw import blend, palette_for
from mlps_dist.core.errors import InputError, MlpsError
from mlps_dist.core.fileio import atomic_open, atomic_write_bytes
from mlps_dist.core.imagerows import image_size, open_rows, rgb_from_pil
from mlps_dist.core.pngstream import PngRowWriter
from mlps_dist.core.progress import Progress
from mlps_dist.core.stain_match import IMAGE_PIXELS, SetStain, spread
from mlps_dist.deploy.windows import segment_bands, segment_image

STREAM_MEGAPIXELS = 16.0  # larger images go through stream_image
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
            raise ValueError(
                f"{file} and {names[rel]} would both be written as {rel}.png; "
                f"pass their folder instead of single files, or rename one"
            )
        names[rel] = file
    return found


def too_large(path: Path, exc: Exception) -> ValueError:
    limit = Image.MAX_IMAGE_PIXELS or 0
    return ValueError(
        f"{path}: {exc.__class__.__name__}: the image has more than --max-megapixels "
        f"{limit / 1e6:g} million pixels (a guard against decompression bombs); pass a larger "
        f"--max-megapixels if it is a genuine image (images over --stream-megapixels are "
        f"processed by row bands), or segment whole slides with mlps segment"
    )


def load_rgb(path: Path) -> np.ndarray:
    """H x W x 3 uint8; see the module docstring for how other colour modes are converted."""
    try:
        with Image.open(path) as img:
            img.load()
            return rgb_from_pil(img)  # a writable copy for torch.from_numpy
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
            raise ValueError(
                f"{path}: cannot be read as an image ({exc}); remove it from --input or re-export it"
            ) from exc


def overlay(rgb: np.ndarray, pred: np.ndarray, palette, band: int = 256) -> np.ndarray:
    """draw.blend of the image and its classes, computed in row bands (its float temporaries
    would take ~70 bytes per pixel of a large image at once)."""
    out = np.empty_like(rgb)
    for top in range(0, rgb.shape[0], band):
        out[top : top + band] = blend(rgb[top : top + band], pred[top : top + band], palette)
    return out


def save_outputs(out_stem: Path, rgb: np.ndarray, pred: np.ndarray, palette) -> None:
    """Class-index PNG and overlay, each written atomically; when the overlay cannot be written
    (a full disk) the class PNG is removed too: an image has both outputs or neither."""
    classes = out_stem.parent / f"{out_stem.name}.png"
    atomic_write_bytes(classes, png.encode_indices(pred, palette, full_palette=True))
    try:
        atomic_write_bytes(out_stem.parent / f"{out_stem.name}_overlay.png", png.encode(overlay(rgb, pred, palette)))
    except BaseException:
        classes.unlink(missing_ok=True)
        raise


STAIN_SAMPLE_PIXELS = 4_000_000  # pixels a streamed image's stain estimate is taken from


def stain_sample(path: Path, decode, limit: int = STAIN_SAMPLE_PIXELS) -> np.ndarray:
    """(N, 3) pixels on a regular grid of the whole image, one pass over its rows: every pixel
    up to ``limit`` (then the estimate is the whole-image one), else every s-th of every s-th
    row."""
    source = open_rows(path, decode=decode)
    step = max(1, int(np.ceil(np.sqrt(source.width * source.height / limit))))
    picked = []
    try:
        for top in range(0, source.height, 256):
            band = source.rows(top, top + 256)
            picked.append(band[(step - top % step) % step :: step, ::step].reshape(-1, 3))
            source.release(top + 256)
    finally:
        source.close()
    return np.concatenate(picked)


def stream_image(model, path: Path, out_stem: Path, window: int, overlap: float, batch_size: int) -> None:
    """One image read, predicted and written by row bands (imagerows, windows.segment_bands,
    pngstream): the same classes and overlay bytes as the whole-image path, with memory set by
    the window and the image's width. Stains are estimated once from a sample of the whole
    image (a first pass over its rows) and applied band by band."""
    transform = None
    # an image that cannot be read by rows is decoded once for both passes, not twice
    decode = functools.lru_cache(maxsize=1)(load_rgb)
    if model.stain is not None:
        if isinstance(model.stain, SetStain):  # the input set's estimate: no pass over the rows
            estimate = model.stain.fixed
        else:
            estimate = model.stain.estimate(stain_sample(path, decode))
        transform = lambda band: model.stain.apply(band, estimate)  # noqa: E731
    source = open_rows(path, transform, decode=decode)
    classes = out_stem.parent / f"{out_stem.name}.png"
    overlay_path = out_stem.parent / f"{out_stem.name}_overlay.png"
    committed = []
    try:
        with atomic_open(classes) as class_file, atomic_open(overlay_path) as overlay_file:
            class_png = PngRowWriter(class_file, source.width, source.height, palette=model.palette)
            overlay_png = PngRowWriter(overlay_file, source.width, source.height)
            for top, rows in segment_bands(model.tile_scores, source, window, overlap, batch_size):
                class_png.write(rows)
                overlay_png.write(overlay(source.rows(top, top + len(rows), raw=True), rows, model.palette))
            class_png.close()
            overlay_png.close()
            committed.append(overlay_path)  # the inner file is renamed into place first
    except BaseException:
        for path_done in committed:  # both outputs or neither
            path_done.unlink(missing_ok=True)
        raise
    finally:
        source.close()


class RunModel:
    """Torch backend: the predictor of a run, windows blended by windows.segment_image
    (predict.sliding_window's rule)."""

    def __init__(self, args):
        from mlps_dist import dist
        from mlps_dist.config import load_config
        from mlps_dist.core import layout
        from mlps_dist.predict.predictor import create_predictor, training_patch_size

        cfg = load_config(layout.existing_config_file(args.run))
        self.predictor, meta = create_predictor(
            args.run,
            cfg,
            checkpoint=args.checkpoint or "best",
            gate=not args.no_gate,
            gate_threshold=args.gate_threshold,
            device=dist.device(),
        )
        info = None
        try:
            from mlps_dist.data.shards import read_info

            info = read_info(cfg.data.root)
        except (OSError, ValueError):
            pass  # shards not reachable from here: generated colours, data.image_size windows
        self.patch_size = training_patch_size(cfg, info)
        self.palette = palette_for(int(meta["num_classes"]), info)
        self.stain = self.predictor.stain

    def tile_scores(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, h, w) windows, stains already normalised -> float32 (N, C, h, w) gated scores."""
        import torch

        with torch.no_grad():
            return self.predictor(torch.from_numpy(tiles), stain=False).scores().float().cpu().numpy()


class ExportedModel:
    """ONNX backend: deploy.OnnxModel, windows blended by windows.segment_image (numpy)."""

    def __init__(self, args):
        from mlps_dist.deploy.onnx_model import OnnxModel

        self.model = OnnxModel(args.model)
        self.patch_size, self.palette = self.model.patch_size, self.model.palette
        self.stain = self.model.stain

    def tile_scores(self, tiles: np.ndarray) -> np.ndarray:
        return self.model.scores(tiles, stain=False)


def segment(model, rgb: np.ndarray, window: int, overlap: float, batch_size: int) -> np.ndarray:
    """The whole-image path: stains normalised once over the whole image (as
    predict.sliding_window does), the windows blended in row bands (windows.segment_image)."""
    if model.stain is not None:
        rgb = model.stain(rgb)
    return segment_image(model.tile_scores, rgb, window, overlap, batch_size)


def run(args, rank: int = 0, world: int = 1, group=None) -> int:
    """The inputs are listed first (a missing --input creates no --out); then --out is checked
    against them, claimed and locked (mlps_dist/core/toolout.py) for the run."""
    from mlps_dist.core.toolout import tool_output

    Image.MAX_IMAGE_PIXELS = int(args.max_megapixels * 1e6)
    files = list_inputs(args.input)
    with tool_output(args.out, args.input, "infer", group, force=args.force):
        return _run(args, files, rank, world)


def set_stain(stain, scope: str | None, files: list[Path]):
    """The model's stain object for this call: with scope ``set`` one estimate from a grid
    sample of up to stain_match.SET_IMAGES of all the inputs (not only this rank's: every rank
    and every rerun of the same inputs maps them alike)."""
    if stain is None:
        return None
    scope = scope or stain.default_scope
    if scope == "image":
        return stain
    sample = [files[i] for i in spread(len(files))]
    check_readable(sample)  # also other ranks' files: each rank reads the same sample
    pixels = np.concatenate([stain_sample(path, load_rgb, IMAGE_PIXELS) for path in sample])
    return SetStain(stain, stain.estimate(pixels))


def _run(args, files, rank: int, world: int) -> int:
    mine = files[rank::world]  # every file on exactly one rank
    check_readable([f for f, _ in mine])
    model = ExportedModel(args) if args.model else RunModel(args)
    model.stain = set_stain(model.stain, args.stain_scope, [f for f, _ in files])
    window = int(args.patch or model.patch_size)
    progress = Progress("infer", len(mine), "images", enabled=rank == 0)  # rank 0's share
    for file, rel in mine:
        width, height = image_size(file)
        if width * height > args.stream_megapixels * 1e6:
            stream_image(model, file, Path(args.out) / rel, window, args.overlap, args.batch_size)
        else:
            rgb = load_rgb(file)
            pred = segment(model, rgb, window, args.overlap, args.batch_size)
            save_outputs(Path(args.out) / rel, rgb, pred, model.palette)
        progress.update()
    progress.close()
    return len(files)


def infer(args) -> tuple[int, int]:
    """Segment ``args.input`` into ``args.out`` (``mlps infer``: the flags are
    mlps_dist/cli/infer.py's): one process with ``--model``, else every rank of the process
    group (torchrun) its share. Returns (images, rank)."""
    try:
        if args.model:  # one process, no torch
            return run(args), 0
        from mlps_dist import dist

        dist.init("auto")
        try:
            rank = dist.get_rank()
            count = run(args, rank, dist.get_world_size(), group=dist)
            dist.barrier()
            return count, rank
        finally:
            dist.teardown()
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, MlpsError):
            raise
        raise InputError(str(exc)) from exc  # each rank names its own bad files
