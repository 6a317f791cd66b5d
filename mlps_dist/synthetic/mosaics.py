"""Real-tissue mosaics: patches in the LUAD-HistoSeg layout cut out of real single-class tiles.

    plan = split_by_source(scan_tiles(...), counts, seed, pins)          # mosaic_tiles.py
    summary = write_mosaics(out, catalogue, plan, counts, seed, MosaicOptions(size=150))

Each patch comes from one source image of its split: 1-3 of the tissue classes that image
has tiles of (P = ``classes_per_patch``), an irregular region per class (argmax of smooth
random fields, bicubic-upsampled noise with a finer field roughening the borders), each
region filled with one real tile of its class under a random dihedral transform (cropped at
a random place, or resized up first, when the tile's size differs from the patch's); in a
share of patches (``glass_prob``) holes of real empty glass from a background tile.

Masks are exact by construction: a region's class on every pixel of its tile, the ignore
index (4) on the glass holes and on the white pixels inside tissue tiles (lumen, fat
vacuoles: grey > ``white_grey`` and max - min of R, G, B <= ``white_saturation``, grey as
cv2 computes it, as mlps_dist.method.cam.grey_levels). A class whose region covers less than
``min_share`` of the patch's non-ignored pixels is absorbed into its neighbours before the
patch is written, so the train label (in the file name) is exactly the set of classes in
the mask, and every labelled class covers at least that share.

``stain_change`` (val/test only): a strong stain and scanner change applied after the
mosaic (the mask does not change): the Ruifrok-Johnston H and E optical densities scaled by
about ``stain_h`` and ``stain_e`` (the residual third channel by their mean), both stain
vectors turned by about ``stain_hue`` degrees about the grey axis, the lamp scaled by
``stain_brightness``; drawn per patch around those values from a generator of its own, so
the mosaic is the same with and without it.

Patch ``i`` of a split is drawn from ``default_rng([seed, split, i])``: the same seed gives
the same bytes for any number of worker processes, and a rerun keeps finished files.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core import png
from mlps_dist.core.errors import InputError
from mlps_dist.core.fileio import atomic_write_bytes, atomic_write_json
from mlps_dist.synthetic.mosaic_tiles import LUAD_CLASSES, SPLITS, Catalogue, SplitPlan, load_tile
from mlps_dist.synthetic.patches import PALETTE
from mlps_dist.synthetic.tissue import smooth_field

IGNORE = len(LUAD_CLASSES)
MARKER = "mosaics.json"
SOURCES_FILE = "sources.json"
FORMAT_VERSION = 1
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
GRID_COLUMNS = 64
# Ruifrok & Johnston H, E, DAB optical-density vectors (as skimage.color.rgb_from_hed).
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)


@dataclass(frozen=True)
class MosaicOptions:
    size: int = 150
    classes_per_patch: tuple = (0.35, 0.40, 0.25)  # P(1, 2, 3 tissue classes); LUAD-HistoSeg has single-class ones
    glass_prob: float = 0.35  # share of patches with holes of empty glass (4-35 % of the patch)
    min_share: float = 0.02  # of the non-ignored pixels: a class below it is absorbed (not labelled)
    white_grey: int = 200
    white_saturation: int = 20
    stain_change: bool = False
    stain_h: float = 0.55
    stain_e: float = 0.6
    stain_hue: float = 12.0
    stain_brightness: float = 1.05

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> grey int32, bit-exact with cv2's RGB2GRAY (mlps_dist.method.cam.grey_levels)."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + (1 << 13)) >> 14


def white_pixels(rgb: np.ndarray, grey: int = 200, saturation: int = 20) -> np.ndarray:
    channels = rgb.astype(np.int32)
    return (grey_levels(rgb) > grey) & ((channels.max(-1) - channels.min(-1)) <= saturation)


def dihedral(tile: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/reflections of a tile (k in 0..7)."""
    out = np.rot90(tile, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def fit_tile(rng: np.random.Generator, tile: np.ndarray, size: int) -> np.ndarray:
    """A random dihedral transform of the tile, cut to size x size at a random place (resized
    up, bicubic, when its shorter side is below ``size``)."""
    tile = dihedral(tile, int(rng.integers(8)))
    h, w = tile.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        tile = np.asarray(Image.fromarray(tile).resize((w, h), Image.BICUBIC))
    y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return tile[y : y + size, x : x + size]


_ROOT: list = [None]


@lru_cache(maxsize=2048)
def _tile(rel: str) -> np.ndarray:
    return load_tile(Path(_ROOT[0]) / rel)


def _region_fields(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    return np.stack(
        [
            smooth_field(rng, size, rng.uniform(1.2, 3.0))
            + rng.normal(0, 0.6)
            + 0.18 * smooth_field(rng, size, size / 14)
            for _ in range(count)
        ]
    )


def _attempt(
    rng: np.random.Generator, per_class: dict[int, list[str]], glass: list[str], options: MosaicOptions
) -> tuple[np.ndarray, np.ndarray]:
    size = options.size
    probs = np.array(options.classes_per_patch, float)[: len(per_class)]
    count = int(rng.choice(len(probs), p=probs / probs.sum())) + 1
    available = sorted(per_class)
    classes = [available[i] for i in sorted(rng.choice(len(available), size=count, replace=False))]
    tiles = np.stack([fit_tile(rng, _tile(per_class[c][int(rng.integers(len(per_class[c])))]), size) for c in classes])
    fields = _region_fields(rng, count, size)
    holes = np.zeros((size, size), bool)
    glass_tile = None
    if glass and rng.random() < options.glass_prob:
        field = smooth_field(rng, size, rng.uniform(2.0, 5.0)) + 0.15 * smooth_field(rng, size, size / 12)
        holes = field > np.quantile(field, 1.0 - rng.uniform(0.04, 0.35))
        glass_tile = fit_tile(rng, _tile(glass[int(rng.integers(len(glass)))]), size)
    keep = np.ones(count, bool)
    rows, cols = np.indices((size, size))
    while True:  # absorb classes too small to be labelled into their neighbours
        owner = np.argmax(np.where(keep[:, None, None], fields, -np.inf), axis=0)
        rgb = tiles[owner, rows, cols]
        ignored = holes | white_pixels(rgb, options.white_grey, options.white_saturation)
        area = np.bincount(owner[~ignored], minlength=count)
        small = keep & (area < options.min_share * max(1, int((~ignored).sum())))
        if not small.any() or keep.sum() == 1:
            break
        keep[np.argmin(np.where(small, area, np.inf))] = False  # the smallest first, then re-check
    if glass_tile is not None:
        rgb[holes] = glass_tile[holes]
    mask = np.asarray(classes, np.uint8)[owner]
    mask[ignored] = IGNORE
    return rgb, mask


def draw_patch(
    rng: np.random.Generator, per_class: dict[int, list[str]], glass: list[str], options: MosaicOptions
) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 HxWx3, mask uint8 HxW) of one patch from one source's tiles ``per_class``.
    A draw with under 10 % of non-ignored pixels (very white tiles, large holes) is redrawn."""
    for _ in range(20):
        rgb, mask = _attempt(rng, per_class, glass, options)
        if (mask != IGNORE).mean() >= 0.1:
            break
    return rgb, mask


def _rotate(vector: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.ones(3) / np.sqrt(3)
    t = np.radians(degrees)
    out = vector * np.cos(t) + np.cross(axis, vector) * np.sin(t) + axis * axis.dot(vector) * (1 - np.cos(t))
    out = np.clip(out, 0.01, None)
    return out / np.linalg.norm(out)


def stain_change(rgb: np.ndarray, rng: np.random.Generator, options: MosaicOptions) -> np.ndarray:
    """Another lab's stain and scanner (see the module docstring), drawn around the options' values."""
    h_scale = options.stain_h * rng.uniform(0.92, 1.08)
    e_scale = options.stain_e * rng.uniform(0.92, 1.08)
    hue = options.stain_hue + rng.normal(0, 2.0)
    light = 255.0 * options.stain_brightness * rng.uniform(0.98, 1.02)
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    conc = od @ np.linalg.inv(_HED)
    conc[..., 0] *= h_scale
    conc[..., 1] *= e_scale
    conc[..., 2] *= 0.5 * (h_scale + e_scale)  # the residual channel carries stain too on H&E
    target = np.stack([_rotate(_HED[0], hue), _rotate(_HED[1], hue), _HED[2]])
    out = light * np.exp(-(conc @ target))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _pid(source: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in source) or "tiles"


def _origin(seed: int, split: str, index: int, plan: SplitPlan, size: int):
    """(name stem ``pid-x-y``, source image, the generator that then draws the patch)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    sources = sorted(plan.tiles[split])
    source = sources[int(rng.integers(len(sources)))]
    x, y = (index % GRID_COLUMNS) * size, (index // GRID_COLUMNS) * size  # unique names in a split
    return f"{_pid(source)}-{x}-{y}", source, rng


def sample(seed: int, split: str, index: int, plan: SplitPlan, options: MosaicOptions):
    """(name stem ``pid-x-y``, rgb, mask) of patch ``index`` of ``split``, independent of all others."""
    stem, source, rng = _origin(seed, split, index, plan, options.size)
    rgb, mask = draw_patch(rng, plan.tiles[split][source], plan.glass.get(split, []), options)
    if options.stain_change and split != "train":
        rgb = stain_change(rgb, np.random.default_rng([seed, SPLIT_IDS[split], index, 7]), options)
    return stem, rgb, mask


def labels_of(mask: np.ndarray) -> list[int]:
    present = np.bincount(mask.ravel(), minlength=IGNORE + 1)
    return [int(present[c] > 0) for c in range(IGNORE)]


def train_name(stem: str, labels: list[int]) -> str:
    return f"{stem}-[{' '.join(str(v) for v in labels)}].png"


_STATE: dict = {}


def _init(root: str, plan: SplitPlan, options: MosaicOptions, seed: int, out: str) -> None:
    _ROOT[0] = root
    _tile.cache_clear()
    _STATE.update(plan=plan, options=options, seed=seed, out=Path(out))


def _job(job: tuple[str, int]) -> tuple[str, list[int]]:
    """Write patch ``index`` of ``split``; return its stem and its mask's pixel counts."""
    split, index = job
    out, options = _STATE["out"], _STATE["options"]
    stem, rgb, mask = sample(_STATE["seed"], split, index, _STATE["plan"], options)
    if split == "train":
        atomic_write_bytes(out / "train" / train_name(stem, labels_of(mask)), png.encode(rgb))
    else:
        atomic_write_bytes(out / split / "img" / f"{stem}.png", png.encode(rgb))
        atomic_write_bytes(out / split / "mask" / f"{stem}.png", png.encode_indices(mask, PALETTE))
    return stem, np.bincount(mask.ravel(), minlength=IGNORE + 1).tolist()


def _prepare(out: Path, params: dict) -> None:
    marker = out / MARKER
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("params")
        if previous != params:
            changed = sorted(k for k in set(previous or {}) | set(params) if (previous or {}).get(k) != params.get(k))
            raise InputError(
                f"--out {out}: holds mosaics made with other settings ({', '.join(changed)}); "
                f"choose another --out folder or delete this one"
            )
    for sub in ("train", "val/img", "val/mask", "test/img", "test/mask"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_json(marker, {"params": params, "complete": False})


def _mask_counts(path: Path) -> list[int]:
    return np.bincount(np.asarray(Image.open(path)).ravel(), minlength=IGNORE + 1).tolist()


def write_mosaics(
    out: str | Path,
    catalogue: Catalogue,
    plan: SplitPlan,
    counts: dict[str, int],
    seed: int,
    options: MosaicOptions,
    workers: int = 1,
    params_extra: dict | None = None,
) -> dict:
    """Write every split under ``out`` (claimed by the caller), keeping finished files; then
    OUT/sources.json (which source images and how many tiles of each class went where, patch
    label and pixel counts) and the summary in OUT/mosaics.json. Returns the summary."""
    out = Path(out)
    params = {
        "version": FORMAT_VERSION,
        "counts": dict(counts),
        "seed": int(seed),
        "options": options.as_dict(),
        "classes": {LUAD_CLASSES[i]: f for i, f in catalogue.folders.items()},
        "splits": {
            s: {src: {LUAD_CLASSES[i]: v for i, v in per.items()} for src, per in t.items()}
            for s, t in plan.tiles.items()
        },
        "glass": plan.glass,
        **(params_extra or {}),
    }
    _prepare(out, params)
    existing_train = {n.rsplit("-[", 1)[0]: n for n in (p.name for p in (out / "train").glob("*-[[]*].png"))}
    jobs = [(split, index) for split in SPLITS for index in range(counts.get(split, 0))]
    init = (str(catalogue.root), plan, options, int(seed), str(out))
    todo = [job for job in jobs if not _finished(out, job, plan, options, int(seed), existing_train)]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(min(workers, len(todo)), initializer=_init, initargs=init) as pool:
            made = dict(((j[0], s), c) for j, (s, c) in zip(todo, pool.map(_job, todo, chunksize=4)))
    else:
        _init(*init)
        made = {(j[0], s): c for j, (s, c) in zip(todo, map(_job, todo))}
    summary = _summarise(out, catalogue, plan, counts, options, made, len(todo))
    atomic_write_json(out / SOURCES_FILE, summary["sources"])
    # The files hold nothing that depends on the folder's name or on how much a rerun had left to do.
    atomic_write_json(out / MARKER, {"params": params, "complete": True, "sources": summary["sources"]})
    return summary


def _stem(index: int, split: str, plan: SplitPlan, seed: int, options: MosaicOptions) -> str:
    return _origin(seed, split, index, plan, options.size)[0]


def _finished(out: Path, job, plan, options, seed, existing_train) -> bool:
    split, index = job
    stem = _stem(index, split, plan, seed, options)
    if split == "train":
        return stem in existing_train
    return (out / split / "img" / f"{stem}.png").is_file() and (out / split / "mask" / f"{stem}.png").is_file()


def _summarise(out, catalogue, plan, counts, options, made, generated) -> dict:
    seed = json.loads((out / MARKER).read_text())["params"]["seed"]
    existing_train = {n.rsplit("-[", 1)[0]: n for n in (p.name for p in (out / "train").glob("*-[[]*].png"))}
    splits = {}
    for split in SPLITS:
        n = counts.get(split, 0)
        if not n:
            continue
        pixels = np.zeros(IGNORE + 1, np.int64)
        labelled = Counter()
        per_source = Counter()
        for index in range(n):
            stem, source, _ = _origin(seed, split, index, plan, options.size)
            per_source[source] += 1
            if split == "train":
                digits = existing_train[stem].rsplit("-[", 1)[1][:-5].split()
                labelled.update(LUAD_CLASSES[c] for c, d in enumerate(digits) if d == "1")
            else:
                c = made.get((split, stem)) or _mask_counts(out / split / "mask" / f"{stem}.png")
                pixels += np.asarray(c)
        tiles = {
            LUAD_CLASSES[i]: {src: len(per[i]) for src, per in plan.tiles[split].items() if i in per}
            for i in catalogue.folders
        }
        record = {
            "sources": sorted(plan.tiles[split]),
            "patches": n,
            "patches_per_source": dict(sorted(per_source.items())),
            "tiles": tiles,
            "glass_tiles": len(plan.glass.get(split, [])),
        }
        if split == "train":
            record["patches_labelled"] = {c: labelled[c] for c in LUAD_CLASSES}
        else:
            total = max(1, int(pixels.sum()))
            record["pixel_share"] = {
                name: round(int(pixels[i]) / total, 4) for i, name in enumerate([*LUAD_CLASSES, "ignore"])
            }
        splits[split] = record
    sources = {
        "split_by": plan.by,
        "rule": catalogue.rule,
        "tiles": str(catalogue.root),
        "classes": {LUAD_CLASSES[i]: f for i, f in catalogue.folders.items()},
        "splits": splits,
        "unused_sources": plan.unused,
    }
    return {"out_dir": str(out), "counts": dict(counts), "generated": generated, "sources": sources}
