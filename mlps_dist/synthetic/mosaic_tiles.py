"""Tiles for the real-tissue mosaics: a class-per-folder collection, its source images, the splits.

    classes = parse_classes("TE=TUM,NEC=DEB,LYM=LYM,TAS=STR")      # LUAD index -> folder
    catalogue = scan_tiles(root, classes, "BACK", source_regex=DEFAULT_SOURCE_REGEX)
    plan = split_by_source(catalogue, counts, seed, pins={"val": ["04"], "test": ["05"]})

A tile's *source* is the image it was cut from: by default the second '_'-separated field
of its file name up to its first ``-<digits>``, a letter after them naming a part of the same
image (``10F32_CRC-Prim-HE-03_012_Row_1_Col_301.png`` -> ``CRC-Prim-HE-03``,
``14AF3_CRC-Prim-HE-01b_Row_301_Col_301.png`` -> ``CRC-Prim-HE-01``: the Kather et al.
naming), another regular expression (its group ``source``, else group 1,
else the whole match), or a CSV ``file,source`` (file relative to the tile folder, or a bare
file name). Splitting by source puts whole source images into splits, so that no image is
in two; background (glass) tiles carry no label and are split by tile. Every problem is an
InputError (exit 2) naming the flag or the file and what to change.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mlps_dist.core.errors import InputError

LUAD_CLASSES = ("TE", "NEC", "LYM", "TAS")  # the label digits of the LUAD-HistoSeg layout, in order
DEFAULT_CLASSES = "TE=TUM,NEC=DEB,LYM=LYM,TAS=STR"
DEFAULT_SOURCE_REGEX = r"^[^_]+_(?P<source>.+?-\d+)[a-z]?_"
TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
SPLIT_SHARES = (0.7, 0.1, 0.2)  # tiles per split when not splitting by source (and glass: see split_glass)


@dataclass
class Catalogue:
    """Every usable tile: tissue tiles per LUAD class index and source, and the glass tiles."""

    root: Path
    folders: dict[int, str]  # LUAD class index -> tile folder
    tiles: dict[int, dict[str, list[str]]]  # class index -> source -> tile paths relative to root (sorted)
    glass: list[str]
    size: int  # smallest tile side
    rule: dict = field(default_factory=dict)  # how sources were named (recorded in sources.json)

    def sources(self) -> list[str]:
        return sorted({s for per_source in self.tiles.values() for s in per_source})


@dataclass
class SplitPlan:
    """What each split draws from: source -> class index -> tile paths; glass tile paths."""

    tiles: dict[str, dict[str, dict[int, list[str]]]]
    glass: dict[str, list[str]]
    by: str  # "source" or "tile"
    unused: list[str] = field(default_factory=list)


def parse_classes(text: str) -> dict[int, str]:
    """``TE=TUM,NEC=DEB,...`` -> {LUAD class index: tile folder}; a bare ``FOLDER`` entry takes
    the LUAD class of its position. Classes left out never appear in a patch (label digit 0)."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries or len(entries) > len(LUAD_CLASSES):
        raise InputError(
            f"--classes {text!r}: give 1-{len(LUAD_CLASSES)} entries NAME=FOLDER with NAME one of "
            f"{', '.join(LUAD_CLASSES)} (default {DEFAULT_CLASSES})"
        )
    mapping: dict[int, str] = {}
    for position, entry in enumerate(entries):
        name, _, folder = entry.rpartition("=") if "=" in entry else (LUAD_CLASSES[position], "=", entry)
        name, folder = name.strip(), folder.strip()
        if name not in LUAD_CLASSES:
            raise InputError(
                f"--classes {text!r}: unknown class name {name!r}; the LUAD-HistoSeg layout has "
                f"{', '.join(LUAD_CLASSES)} (write NAME=FOLDER, e.g. {DEFAULT_CLASSES})"
            )
        index = LUAD_CLASSES.index(name)
        if index in mapping or not folder:
            problem = "twice" if index in mapping else "no folder"
            raise InputError(f"--classes {text!r}: class {name} is given {problem}")
        mapping[index] = folder
    return dict(sorted(mapping.items()))


def _tile_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TILE_SUFFIXES)


def class_folder(root: Path, folder: str, flag: str) -> list[Path]:
    path = root / folder
    if not path.is_dir():
        there = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise InputError(f"{flag}: no folder {path} (folders in --tiles: {', '.join(there) or 'none'})")
    files = _tile_files(path)
    if not files:
        raise InputError(
            f"{flag}: {path} holds no tiles ({'/'.join(TILE_SUFFIXES)}): too few tiles to draw from; "
            f"add tiles there or name another folder"
        )
    return files


def load_tile(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a tile; an unreadable file is an InputError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("RGB", "RGBA", "LA", "L", "P"):
                raise InputError(f"{path}: image mode {img.mode} is not 8-bit RGB/RGBA/greyscale; convert it to RGB")
            return np.asarray(img.convert("RGB"))
    except InputError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise InputError(f"{path}: unreadable image ({exc}); replace or remove the file") from exc


def read_source_csv(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--source-csv {path}: no such file (expected lines 'file,source')")
    table: dict[str, str] = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or (number == 1 and [c.strip().lower() for c in row[:2]] == ["file", "source"]):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise InputError(f"--source-csv {path}: line {number}: expected 'file,source'")
            table[row[0].strip()] = row[1].strip()
    return table


def source_namer(source_regex: str | None, source_csv: str | Path | None):
    """(function relative path -> source or None, the rule as a record)."""
    if source_csv is not None:
        table = read_source_csv(source_csv)
        return (lambda rel: table.get(rel, table.get(Path(rel).name))), {"csv": str(source_csv)}
    try:
        pattern = re.compile(source_regex or DEFAULT_SOURCE_REGEX)
    except re.error as exc:
        raise InputError(f"--source-regex {source_regex!r}: not a regular expression ({exc})") from exc

    def name(rel: str) -> str | None:
        m = pattern.search(Path(rel).name)
        if not m:
            return None
        return m["source"] if "source" in pattern.groupindex else m[1] if pattern.groups else m[0]

    return name, {"regex": pattern.pattern}


def scan_tiles(
    root: str | Path,
    classes: dict[int, str],
    background: str | None,
    source_regex: str | None = None,
    source_csv: str | Path | None = None,
    require_sources: bool = False,
) -> Catalogue:
    """List and decode every tile (an unreadable one stops here, named). Tiles whose source
    cannot be named are an error when ``require_sources`` (splitting by source), else they
    share one source ``tiles``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--tiles {root}: no such folder (expected one folder of tiles per class)")
    namer, rule = source_namer(source_regex, source_csv)
    flag = "--source-csv" if source_csv is not None else "--source-regex"
    tiles: dict[int, dict[str, list[str]]] = {}
    sides: list[int] = []
    for index, folder in classes.items():
        per_source: dict[str, list[str]] = {}
        for path in class_folder(root, folder, f"--classes {LUAD_CLASSES[index]}={folder}"):
            rel = path.relative_to(root).as_posix()
            source = namer(rel)
            if source is None:
                if require_sources:
                    raise InputError(
                        f"{path}: {flag} {rule.get('regex', rule.get('csv'))!r} names no source image "
                        f"for this tile; give --source-regex or a --source-csv line for it"
                    )
                source = "tiles"
            sides.append(min(load_tile(path).shape[:2]))
            per_source.setdefault(source, []).append(rel)
        tiles[index] = dict(sorted(per_source.items()))
    glass: list[str] = []
    if background:
        for path in class_folder(root, background, f"--background {background}"):
            sides.append(min(load_tile(path).shape[:2]))
            glass.append(path.relative_to(root).as_posix())
    return Catalogue(root, dict(classes), tiles, glass, min(sides), rule)


def _resolve(names: list[str], sources: list[str], flag: str) -> list[str]:
    """Source names as given, or a unique suffix of one (``04`` -> ``CRC-Prim-HE-04``)."""
    found = []
    for name in names:
        hits = [name] if name in sources else [s for s in sources if s.endswith(name)]
        if len(hits) != 1:
            raise InputError(
                f"{flag} {name!r}: {'matches ' + ', '.join(hits) if hits else 'no such source image'}; "
                f"the sources are {', '.join(sources)}"
            )
        found.append(hits[0])
    return found


def _check_classes(catalogue: Catalogue, split: str, sources: list[str], flag: str) -> None:
    for index, folder in catalogue.folders.items():
        if not any(catalogue.tiles[index].get(s) for s in sources):
            raise InputError(
                f"{flag}: the {split} split's source images ({', '.join(sources) or 'none'}) hold no "
                f"tiles of class {LUAD_CLASSES[index]} (folder {folder}); give it a source that has them"
            )


def split_glass(glass: list[str], counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Glass tiles split by tile (SPLIT_SHARES) when every split that needs one gets one, else shared."""
    needed = [s for s in SPLITS if counts.get(s, 0) > 0]
    if len(glass) < len(needed):
        return {s: list(glass) for s in needed}
    order = [glass[i] for i in np.random.default_rng([seed, 77]).permutation(len(glass))]
    return dict(zip(needed, _shares(order, [SPLIT_SHARES[SPLITS.index(s)] for s in needed])))


def _shares(items: list, shares: list[float]) -> list[list]:
    """Consecutive parts of ``items`` in proportion to ``shares``, at least one item each."""
    total, cuts = sum(shares), []
    for i in range(1, len(shares)):
        cuts.append(int(round(len(items) * sum(shares[:i]) / total)))
    cuts = [min(max(c, i + 1), len(items) - (len(shares) - 1 - i)) for i, c in enumerate(cuts)]
    for i in range(1, len(cuts)):
        cuts[i] = max(cuts[i], cuts[i - 1] + 1)
    bounds = [0, *cuts, len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _plan_from_sources(catalogue: Catalogue, assigned: dict[str, list[str]], counts, seed, unused) -> SplitPlan:
    tiles = {
        split: {s: {i: catalogue.tiles[i][s] for i in catalogue.folders if catalogue.tiles[i].get(s)} for s in sources}
        for split, sources in assigned.items()
    }
    return SplitPlan(tiles, split_glass(catalogue.glass, counts, seed), "source", unused)


def split_by_source(
    catalogue: Catalogue, counts: dict[str, int], seed: int, pins: dict[str, list[str]] | None = None
) -> SplitPlan:
    """Whole source images per split. ``pins`` (split -> source names) fixes them: train then
    defaults to every source not pinned elsewhere, a pinned split with patches must be pinned
    for val and test alike. Without pins the sources are shuffled (seed) into train and one
    fifth each (at least one) for val and test, redrawn until every split has every class."""
    sources = catalogue.sources()
    needed = [s for s in SPLITS if counts.get(s, 0) > 0]
    pins = {k: v for k, v in (pins or {}).items() if v}
    if pins:
        assigned = {s: _resolve(pins[s], sources, f"--sources-{s}") for s in pins}
        if "train" not in assigned:
            taken = {x for v in assigned.values() for x in v}
            assigned["train"] = [s for s in sources if s not in taken]
        for split in needed:
            if split not in assigned:
                raise InputError(
                    f"--sources-{split}: the {split} split has {counts[split]} patches but no pinned "
                    f"source image; name one or more of {', '.join(sources)}"
                )
        seen: dict[str, str] = {}
        for split in needed:
            for source in assigned[split]:
                if source in seen:
                    raise InputError(
                        f"--sources-{split}: source image {source} is also in --sources-{seen[source]}; "
                        f"a source image may be in one split only"
                    )
                seen[source] = split
        assigned = {s: assigned[s] for s in needed}
        for split in needed:
            _check_classes(catalogue, split, assigned[split], f"--sources-{split}")
        used = {x for v in assigned.values() for x in v}
        return _plan_from_sources(catalogue, assigned, counts, seed, [s for s in sources if s not in used])
    held = [s for s in needed if s != "train"]
    if len(sources) < len(needed):
        raise InputError(
            f"--split-by-source: {len(sources)} source image(s) ({', '.join(sources)}) for "
            f"{len(needed)} splits with patches; too few tiles' sources, or set a split's count to 0"
        )
    first_error = None
    for attempt in range(100):
        order = [sources[i] for i in np.random.default_rng([seed, 78, attempt]).permutation(len(sources))]
        each = max(1, int(round(0.2 * len(sources))))
        each = min(each, (len(sources) - ("train" in needed)) // max(1, len(held))) or 1
        assigned, start = {}, 0
        for split in held:
            assigned[split], start = order[start : start + each], start + each
        if "train" in needed:
            assigned["train"] = order[start:]
        try:
            for split in needed:
                _check_classes(catalogue, split, assigned[split], "--split-by-source")
        except InputError as exc:
            first_error = first_error or exc
            continue
        assigned = {s: sorted(assigned[s]) for s in needed}
        used = {x for v in assigned.values() for x in v}
        return _plan_from_sources(catalogue, assigned, counts, seed, [s for s in sources if s not in used])
    raise InputError(
        f"{first_error} (no assignment of the {len(sources)} source images gives every split every "
        f"class; pin them with --sources-train/--sources-val/--sources-test)"
    )


def split_by_tile(catalogue: Catalogue, counts: dict[str, int], seed: int) -> SplitPlan:
    """Each class's tiles shuffled (seed) and cut into the splits (SPLIT_SHARES): no tile in two
    splits, but a source image may be in several (use split_by_source to prevent that)."""
    needed = [s for s in SPLITS if counts.get(s, 0) > 0]
    shares = [SPLIT_SHARES[SPLITS.index(s)] for s in needed]
    tiles: dict[str, dict[str, dict[int, list[str]]]] = {s: {} for s in needed}
    for index, per_source in catalogue.tiles.items():
        flat = [(source, rel) for source, rels in per_source.items() for rel in rels]
        if len(flat) < len(needed):
            raise InputError(
                f"--classes {LUAD_CLASSES[index]}={catalogue.folders[index]}: {len(flat)} tile(s) for "
                f"{len(needed)} splits; too few tiles (add tiles or set a split's count to 0)"
            )
        order = [flat[i] for i in np.random.default_rng([seed, 79, index]).permutation(len(flat))]
        for split, part in zip(needed, _shares(order, shares)):
            for source, rel in sorted(part):
                tiles[split].setdefault(source, {}).setdefault(index, []).append(rel)
    tiles = {s: dict(sorted(v.items())) for s, v in tiles.items()}
    return SplitPlan(tiles, split_glass(catalogue.glass, counts, seed), "tile")
