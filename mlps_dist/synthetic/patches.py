"""Built-in synthetic H&E dataset in the exact LUAD-HistoSeg folder layout.

    summary = write_luad_layout("data/demo/luad", train=800, val=60, test=60, size=128, seed=0)
    summary = write_luad_layout("data/pale", 800, 60, 60, options=variant_options("pale"))

Layout (as the public dataset): ``train/<pid>-<x>-<y>-[a b c d].png`` with labels for
TE NEC LYM TAS in that order; ``val/img/<pid>-<x>-<y>.png`` + ``val/mask/<same name>`` and
the same for ``test/``; masks are palettised PNGs, 0..3 = tissue, 4 = white/exclude.

Each patch: 1-4 tissues with irregular borders (argmax of smooth random fields), optional
white holes, textures from ``synthetic_tissue``, rendered with Beer-Lambert from random
per-slide and per-patch H and E stain vectors, concentrations and brightness, then blur and
noise. ``SynthOptions`` (``synthetic_options``) shifts all of it: stain strength and hue,
scanner lamp, white balance and gamma, nuclear size and density, texture scale, patch size
and class mix. Glass (mask 4) stays brighter than grey 200 and tissue darker. Tissues
covering less than MIN_TISSUE_FRACTION of the patch are absorbed into their neighbours, so
the train label is exactly the set of tissues in the patch's mask.

Patch ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``: it does
not depend on how many patches are generated, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from mlps_dist.synthetic.options import SynthOptions
from mlps_dist.synthetic.tissue import TISSUE_TEXTURES, smooth_field

CLASSES = ("TE", "NEC", "LYM", "TAS")
WHITE = 4  # mask index of white background / exclude
PALETTE = [(205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)]
MIN_TISSUE_FRACTION = 0.02  # a tissue below 2% of the patch is absorbed by its neighbours
DEFAULT_OPTIONS = SynthOptions()  # class mix, stain, scanner, nuclei: see synthetic_options

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SPLIT_SLIDES = {"train": range(0, 40), "val": range(40, 45), "test": range(45, 50)}  # disjoint slides
GRID_COLUMNS = 64  # patch i sits in cell (i // 64, i % 64) of its slide's grid: names are unique
MARKER = "synthetic.json"
FORMAT_VERSION = 2  # 2: generator options and variants (synthetic_options)


@dataclass
class Stain:
    """How a slide (then a patch) was stained and scanned."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    h_scale: float
    e_scale: float
    light: np.ndarray  # incident intensity per channel (white balance x brightness); > 255 saturates
    blur: float
    noise: float
    gamma: float = 1.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def random_stain(
    rng: np.random.Generator, around: Stain | None = None, options: SynthOptions = DEFAULT_OPTIONS
) -> Stain:
    """A slide's stain drawn around the options' reference, or a patch's drawn around its slide's.

    Scanners are calibrated on glass: the lamp varies between slides (232-250 grey at
    brightness 1) and hardly within one, so glass stays white while stain varies a lot.
    """
    if around is None:
        h_ref, e_ref = options.stain_vectors()
        light = (
            rng.uniform(232, 250) * options.brightness * np.array(options.white_balance) * rng.uniform(0.98, 1.02, 3)
        )
        return Stain(
            h_vec=_unit(h_ref + rng.normal(0, 0.07, 3)),
            e_vec=_unit(e_ref + rng.normal(0, 0.06, 3)),
            h_scale=rng.uniform(0.75, 1.5) * options.h_strength,
            e_scale=rng.uniform(0.8, 1.6) * options.e_strength,
            light=light,
            blur=rng.uniform(0.3, 0.9),
            noise=rng.uniform(1.0, 4.0),
            gamma=options.gamma,
        )
    return Stain(
        h_vec=_unit(around.h_vec + rng.normal(0, 0.03, 3)),
        e_vec=_unit(around.e_vec + rng.normal(0, 0.03, 3)),
        h_scale=around.h_scale * rng.uniform(0.8, 1.25),
        e_scale=around.e_scale * rng.uniform(0.8, 1.25),
        light=np.clip(around.light * rng.uniform(0.97, 1.03) * rng.uniform(0.99, 1.01, 3), 100, 400),
        blur=around.blur * rng.uniform(0.8, 1.2),
        noise=around.noise,
        gamma=around.gamma,
    )


def tissue_layout(rng: np.random.Generator, size: int, options: SynthOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Mask (size x size, uint8): 1-4 tissues with irregular borders, white holes sometimes."""
    count_probs = np.array(options.tissues_per_patch) / sum(options.tissues_per_patch)
    weights = np.array(options.class_weights) / sum(options.class_weights)
    count = rng.choice(4, p=count_probs) + 1
    tissues = rng.choice(4, size=count, replace=False, p=weights)
    # Coarse fields give the regions, a weaker fine field roughens their borders.
    fields = np.stack(
        [
            smooth_field(rng, size, rng.uniform(1.2, 3.0))
            + rng.normal(0, 0.6)
            + 0.18 * smooth_field(rng, size, size / 14)
            for _ in tissues
        ]
    )
    holes = None
    if rng.random() < options.white_prob:
        white_field = smooth_field(rng, size, rng.uniform(2.0, 5.0)) + 0.15 * smooth_field(rng, size, size / 12)
        holes = white_field > np.quantile(white_field, 1.0 - rng.uniform(0.04, 0.35))
    keep = np.ones(count, bool)
    while True:  # absorb tissues too small to be labelled into their neighbours
        owner = np.argmax(np.where(keep[:, None, None], fields, -np.inf), axis=0)
        area = np.bincount(owner[~holes].ravel() if holes is not None else owner.ravel(), minlength=count)
        small = keep & (area < MIN_TISSUE_FRACTION * size * size)
        if not small.any() or keep.sum() == 1:
            break
        keep[np.argmin(np.where(small, area, np.inf))] = False  # drop the smallest first, then re-check
    mask = tissues[owner].astype(np.uint8)
    if holes is not None:
        mask[holes] = WHITE
    return mask


def _resized(values: np.ndarray, size: int) -> np.ndarray:
    if values.shape[0] == size:
        return values
    # A float32 2-D array becomes a mode "F" image: bilinear resampling keeps real values.
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize((size, size), Image.BILINEAR))


def _concentrations(rng: np.random.Generator, mask: np.ndarray, options: SynthOptions) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin maps of the tissues in `mask`. Textures are drawn at
    size / texture_scale pixels and resized to the patch: texture_scale acts as magnification."""
    size = mask.shape[0]
    drawn = max(16, int(round(size / options.texture_scale)))
    hema = np.zeros(mask.shape, np.float32)
    eosin = np.zeros(mask.shape, np.float32)
    for index in np.unique(mask):
        h, e = TISSUE_TEXTURES[index](rng, drawn, scale=options.nuclear_size, density=options.nuclear_density)
        where = mask == index
        hema[where], eosin[where] = _resized(h, size)[where], _resized(e, size)[where]
    return hema, eosin


def render(
    rng: np.random.Generator, mask: np.ndarray, stain: Stain, options: SynthOptions = DEFAULT_OPTIONS
) -> np.ndarray:
    """RGB uint8 H&E image of the tissues in `mask` (Beer-Lambert: I = light * exp(-OD))."""
    size = mask.shape[0]
    hema, eosin = _concentrations(rng, mask, options)
    # Section thickness varies slowly across the patch.
    thickness = 1.0 + 0.08 * smooth_field(rng, size, 1.5)
    od = thickness[..., None] * (
        hema[..., None] * (stain.h_scale * stain.h_vec).astype(np.float32)
        + eosin[..., None] * (stain.e_scale * stain.e_vec).astype(np.float32)
    )
    rgb = np.minimum(stain.light.astype(np.float32) * np.exp(-od), 255.0)  # the sensor saturates
    if stain.gamma != 1.0:
        rgb = 255.0 * (rgb / 255.0) ** np.float32(1.0 / stain.gamma)
    image = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(stain.blur))
    noisy = np.asarray(image, np.float32) + rng.normal(0, stain.noise, (size, size, 3)).astype(np.float32)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def make_patch(
    rng: np.random.Generator, size: int, stain: Stain | None = None, options: SynthOptions = DEFAULT_OPTIONS
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E patch: (rgb uint8 HxWx3, mask uint8 HxW with 0..3 tissue, 4 white)."""
    if stain is None:
        stain = random_stain(rng, random_stain(rng, options=options), options)
    mask = tissue_layout(rng, size, options)
    return render(rng, mask, stain, options), mask


def labels_of(mask: np.ndarray) -> list[int]:
    """Multi-hot patch label (TE NEC LYM TAS) = tissues present in the mask."""
    present = np.bincount(mask.ravel(), minlength=WHITE + 1)
    return [int(present[c] > 0) for c in range(len(CLASSES))]


def slide_stain(seed: int, slide: int, options: SynthOptions = DEFAULT_OPTIONS) -> Stain:
    return random_stain(np.random.default_rng([seed, 1000, slide]), options=options)


def sample_origin(seed: int, split: str, index: int, size: int) -> tuple[str, np.random.Generator]:
    """Name stem ``pid-x-y`` of patch `index` of `split`, and the generator that then draws the patch."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    slides = SPLIT_SLIDES[split]
    slide = int(rng.integers(slides.start, slides.stop))
    stride = size + 32
    x = (index % GRID_COLUMNS) * stride + int(rng.integers(0, 32))
    y = (index // GRID_COLUMNS) * stride + int(rng.integers(0, 32))
    return f"synth{slide:02d}-{x}-{y}", rng


def make_sample(
    seed: int, split: str, index: int, size: int | None = None, options: SynthOptions = DEFAULT_OPTIONS
) -> tuple[str, np.ndarray, np.ndarray]:
    """(name stem, rgb, mask) of patch `index` of `split`, independent of all other patches.
    `size` (default: options.size) overrides the options' patch size."""
    size = int(size or options.size)
    stem, rng = sample_origin(seed, split, index, size)
    slide = int(stem[5:7])
    stain = random_stain(rng, slide_stain(seed, slide, options), options)
    rgb, mask = make_patch(rng, size, stain, options)
    return stem, rgb, mask


def train_name(stem: str, labels: list[int]) -> str:
    return f"{stem}-[{' '.join(str(v) for v in labels)}].png"


def palettised(mask: np.ndarray) -> Image.Image:
    image = Image.fromarray(mask)  # mode "L"; putpalette turns it into "P" keeping the indices
    image.putpalette([v for colour in PALETTE for v in colour])
    return image


def _save_atomic(image: Image.Image, path: Path) -> None:
    # A crash never leaves a truncated PNG under its final name.
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _prepare(out: Path, params: dict) -> set[str]:
    """Check `out` is empty or an earlier run with the same parameters; return the files it holds."""
    marker = out / MARKER
    existing = {str(p.relative_to(out)) for p in out.rglob("*.png")} if out.exists() else set()
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("params") != params:
            raise ValueError(
                f"{out}: holds a synthetic dataset made with {previous.get('params')}, not {params}; "
                f"choose another --out folder or delete this one"
            )
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: folder is not empty and has no {MARKER}; choose an empty or new --out folder")
    for sub in ("train", "val/img", "val/mask", "test/img", "test/mask"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"params": params, "complete": False}, indent=1))
    return existing


def parse_train_name(name: str) -> tuple[str, list[int]]:
    """``pid-x-y-[a b c d].png`` -> (``pid-x-y``, [a, b, c, d])."""
    stem, bracket = name[: -len(".png")].rsplit("-[", 1)
    return stem, [int(v) for v in bracket.rstrip("]").split(" ")]


def _generate(job: tuple) -> tuple[str, np.ndarray]:
    """Draw and write patch ``index`` of ``split``; return its stem and its mask's pixel
    counts per index (a worker's job: it depends on nothing but its arguments)."""
    out, split, index, seed, options = job
    stem, rgb, mask = make_sample(seed, split, index, options=options)
    if split == "train":
        _save_atomic(Image.fromarray(rgb), out / "train" / train_name(stem, labels_of(mask)))
    else:
        _save_atomic(Image.fromarray(rgb), out / f"{split}/img/{stem}.png")
        _save_atomic(palettised(mask), out / f"{split}/mask/{stem}.png")
    return stem, np.bincount(mask.ravel(), minlength=WHITE + 1)


def _write_split(
    out: Path, split: str, count: int, seed: int, options: SynthOptions, existing: set[str], workers: int = 1
) -> tuple[np.ndarray, int]:
    """Write one split, keeping finished files; return (per-class counts, patches generated now).

    Counts are train patches carrying each label, or val/test pixels of each mask index.
    Patches are drawn in ``workers`` processes; each depends only on (seed, split, index), so
    the files are the same whatever the number.
    """
    finished_train = dict(parse_train_name(n[len("train/") :]) for n in existing if n.startswith("train/"))
    stems = [sample_origin(seed, split, index, options.size)[0] for index in range(count)]
    done = (
        (lambda stem: stem in finished_train)
        if split == "train"
        else (lambda stem: f"{split}/img/{stem}.png" in existing and f"{split}/mask/{stem}.png" in existing)
    )
    jobs = [(out, split, index, seed, options) for index, stem in enumerate(stems) if not done(stem)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            made = dict(pool.map(_generate, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        made = dict(map(_generate, jobs))
    totals = np.zeros(WHITE + 1, np.int64)
    for stem in stems:
        if split == "train":
            labels = finished_train.get(stem)
            totals[: len(CLASSES)] += labels if labels is not None else (made[stem][: len(CLASSES)] > 0)
        else:
            totals += (
                made[stem]
                if stem in made
                else np.bincount(np.asarray(Image.open(out / f"{split}/mask/{stem}.png")).ravel(), minlength=WHITE + 1)
            )
    return totals, len(made)


def write_luad_layout(
    out_dir,
    train: int,
    val: int,
    test: int,
    size: int | None = None,
    seed: int = 0,
    options: SynthOptions | None = None,
    variant: str | None = None,
    workers: int = 1,
) -> dict:
    """Generate a synthetic dataset in the LUAD-HistoSeg layout under `out_dir`; return a summary.

    `options` (default: variant `default`) says how the data varies; `size` overrides its
    patch size; `variant` is only recorded; `workers` processes draw the patches (the same
    bytes for any number). Safe to rerun after a crash: the same parameters
    regenerate the same bytes, finished files are kept. A folder holding anything else (or
    data made with other parameters) is refused rather than mixed into.
    """
    for key, value in (("train", train), ("val", val), ("test", test)):
        if int(value) < 0:
            raise ValueError(f"{key}={value}: the number of patches must be >= 0")
    if size is not None and int(size) < 32:
        raise ValueError(f"size={size}: patches must be at least 32 pixels wide")
    options = options or DEFAULT_OPTIONS
    if size is not None:
        options = dataclasses.replace(options, size=int(size))
    size = options.size
    out = Path(out_dir)
    params = {
        "version": FORMAT_VERSION,
        "train": int(train),
        "val": int(val),
        "test": int(test),
        "size": int(size),
        "seed": int(seed),
        "options": options.as_dict(),
    }
    existing = _prepare(out, params)
    start = time.perf_counter()
    counts = {"train": int(train), "val": int(val), "test": int(test)}
    totals, generated = {}, 0
    for split, n in counts.items():
        totals[split], made = _write_split(out, split, n, int(seed), options, existing, workers)
        generated += made
    seconds = time.perf_counter() - start
    names = list(CLASSES) + ["white"]
    summary = {
        "out_dir": str(out),
        "params": params,
        "variant": variant,
        "counts": counts,
        "classes": list(CLASSES),
        "min_tissue_fraction": MIN_TISSUE_FRACTION,
        "train_label_frequency": {c: float(totals["train"][i]) / max(1, train) for i, c in enumerate(CLASSES)},
        "pixel_frequency": {
            split: {c: float(totals[split][i]) / max(1, totals[split].sum()) for i, c in enumerate(names)}
            for split in ("val", "test")
        },
        "generated": generated,  # fewer than the counts when an interrupted run was completed
        "seconds": round(seconds, 3),
        "patches_per_second": round(generated / seconds, 2) if generated and seconds > 0 else None,
    }
    (out / MARKER).write_text(json.dumps({"params": params, "complete": True, "summary": summary}, indent=1))
    return summary
