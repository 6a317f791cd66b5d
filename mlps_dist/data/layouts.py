"""Source dataset layouts: where the patches are and how their names carry labels.

LUAD-HistoSeg (Han et al. 2022)::

    train/ (or training/)  <pid>-<x>-<y>-[a b c d].png      labels TE NEC LYM TAS, spaces inside []
    val/img/, val/mask/    same file names, masks palettised (index 4 = white/excluded)
    test/img/, test/mask/

BCSS-WSSS::

    training/ (or train/)  <BCSS image name>+<idx>[abcd].png e.g.
                           TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png
    val/img/, val/mask/    labels TUM STR LYM NEC, index 4 = background/excluded
    test/img/, test/mask/

Validation/test labels are the classes present in the mask (computed at conversion).
``scan_layout`` only lists files and parses names; decoding and checks happen in ingest.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlps_dist.core.errors import MlpsError


class LayoutError(MlpsError, ValueError):
    """A source file or folder that does not fit the dataset layout."""


@dataclass(frozen=True)
class Layout:
    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # C + 1 colours; the last one is ignore/white
    train_dirs: tuple[str, ...]
    parse_train_name: Callable[[str, int], tuple[list[int], dict]]
    parse_eval_name: Callable[[str], dict]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ignore_index(self) -> int:
        return len(self.classes)


@dataclass
class SourceItem:
    split: str
    image: Path
    mask: Path | None = None
    labels: list[int] | None = None  # from the name (train); from the mask otherwise
    meta: dict = field(default_factory=dict)


def _labels_from_digits(digits: list[str], num_classes: int, fname: str) -> list[int]:
    if len(digits) != num_classes:
        raise LayoutError(f"{fname}: label has {len(digits)} classes, the dataset has {num_classes}")
    if any(d not in "01" for d in digits):
        raise LayoutError(f"{fname}: label digits must be 0 or 1, got {''.join(digits)!r}")
    return [int(d) for d in digits]


_LUAD_TRAIN = re.compile(r"^(?P<pid>.+)-(?P<x>\d+)-(?P<y>\d+)-\[(?P<label>[^\]]*)\]\.png$")
_LUAD_EVAL = re.compile(r"^(?P<pid>.+)-(?P<x>\d+)-(?P<y>\d+)\.png$")


def _luad_train(fname: str, num_classes: int) -> tuple[list[int], dict]:
    m = _LUAD_TRAIN.match(fname)
    if not m:
        raise LayoutError(f"{fname}: name does not look like '<pid>-<x>-<y>-[a b c d].png' (LUAD-HistoSeg)")
    labels = _labels_from_digits(m["label"].split(), num_classes, fname)
    return labels, {"slide": m["pid"], "x": int(m["x"]), "y": int(m["y"])}


def _luad_eval(fname: str) -> dict:
    m = _LUAD_EVAL.match(fname)
    return {"slide": m["pid"], "x": int(m["x"]), "y": int(m["y"])} if m else {}


_BCSS_TRAIN = re.compile(r"^(?P<name>.+)\+(?P<idx>\d+)\[(?P<label>[^\]]*)\]\.png$")
_BCSS_COORDS = re.compile(r"^(?P<slide>.+?)_xmin(?P<x>\d+)_ymin(?P<y>\d+)")


def _bcss_coords(name: str) -> dict:
    m = _BCSS_COORDS.match(name)
    return {"slide": m["slide"], "x": int(m["x"]), "y": int(m["y"])} if m else {}


def _bcss_train(fname: str, num_classes: int) -> tuple[list[int], dict]:
    m = _BCSS_TRAIN.match(fname)
    if not m:
        raise LayoutError(f"{fname}: name does not look like '<image>+<idx>[abcd].png' (BCSS-WSSS)")
    labels = _labels_from_digits(list(m["label"].replace(" ", "")), num_classes, fname)
    # x/y are the region's origin in the slide; 'patch' numbers the crop inside that region.
    return labels, {**_bcss_coords(m["name"]), "patch": int(m["idx"])}


def _bcss_eval(fname: str) -> dict:
    return _bcss_coords(fname[:-4])


LUAD = Layout(
    name="luad",
    classes=("TE", "NEC", "LYM", "TAS"),
    palette=((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)),
    train_dirs=("train", "training"),
    parse_train_name=_luad_train,
    parse_eval_name=_luad_eval,
)

BCSS = Layout(
    name="bcss",
    classes=("TUM", "STR", "LYM", "NEC"),
    palette=((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)),
    train_dirs=("training", "train"),
    parse_train_name=_bcss_train,
    parse_eval_name=_bcss_eval,
)


def create_layout(name: str) -> Layout:
    layouts = {"luad": LUAD, "bcss": BCSS}
    if name not in layouts:
        raise LayoutError(f"unknown layout '{name}'; choose one of {sorted(layouts)}")
    return layouts[name]


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def find_train_dir(layout: Layout, src: Path) -> Path:
    found = [src / d for d in layout.train_dirs if (src / d).is_dir()]
    if not found:
        raise LayoutError(f"{src}: no training folder; expected one of {', '.join(layout.train_dirs)}/")
    if len(found) > 1:
        raise LayoutError(f"{src}: both {found[0].name}/ and {found[1].name}/ exist; keep one training folder")
    # Some releases nest the patches one level deeper (train/img/).
    if not _pngs(found[0]) and (found[0] / "img").is_dir():
        return found[0] / "img"
    return found[0]


def scan_layout(layout: Layout, src: str | Path) -> tuple[dict[str, list[SourceItem]], list[tuple[Path, str]]]:
    """List every source patch per split (sorted by file name), and the files whose names
    could not be parsed as (path, problem). Nothing is decoded here."""
    src = Path(src)
    if not src.is_dir():
        raise LayoutError(f"--src {src} is not a folder")
    items: dict[str, list[SourceItem]] = {"train": []}
    bad: list[tuple[Path, str]] = []
    for path in _pngs(find_train_dir(layout, src)):
        try:
            labels, meta = layout.parse_train_name(path.name, layout.num_classes)
        except LayoutError as exc:
            bad.append((path, str(exc).split(": ", 1)[-1]))
            continue
        items["train"].append(SourceItem("train", path, None, labels, meta))
    for split in ("val", "test"):
        img_dir, mask_dir = src / split / "img", src / split / "mask"
        if not (src / split).is_dir():
            continue
        if not img_dir.is_dir():
            raise LayoutError(f"{src / split}: expected the patches in {img_dir}")
        items[split] = []
        for path in _pngs(img_dir):
            mask = mask_dir / path.name
            if not mask.is_file():
                bad.append((path, f"mask missing (expected {mask})"))
                continue
            items[split].append(SourceItem(split, path, mask, None, layout.parse_eval_name(path.name)))
    return items, bad
