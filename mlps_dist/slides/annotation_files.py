"""Which annotation file belongs to which slide (mlps tile ``--annotations`` and
``--annotations-map``).

    files = find_annotation_files(slide_paths, folder="annotations/", map_csv=None)
    files["slide1"]        # Path of slide1's annotations, or None without either flag

In ``--annotations FOLDER`` a slide ``NAME.EXT`` (e.g. ``slide1.svs``) has its annotations in
``NAME.geojson`` or ``NAME.EXT.geojson`` (QuPath's usual export name ``slide1.svs.geojson``), or
in the ImageScope/ASAP XML ``NAME.xml`` or ``NAME.EXT.xml``. Exactly one of these may exist:
two are refused, naming both (which one was meant cannot be guessed).

``--annotations-map CSV`` names the file of each slide, one ``slide,annotation-file`` row per
slide. ``slide`` is the slide's name (its file name without the extension, as in
``--splits``) or its file name. A relative file is relative to the folder holding the CSV.
A first row whose first cell is ``slide`` is a header; blank rows and rows starting with
``#`` are skipped. A row naming a slide that is not among ``--slides``, a slide named twice
and a file that does not exist are errors naming the row. With both flags, the rows of the
map name their slides' files and the other slides are looked up in the folder.

A slide that neither flag gives a file for stops the run before any tile, naming the slide
and the files looked for.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mlps_dist.core.errors import InputError
from mlps_dist.slides.reader import slide_stem

SUFFIXES = (".geojson", ".xml")


def candidates(folder: Path, slide: Path) -> list[Path]:
    """The file names a slide's annotations may have in ``folder``, without duplicates."""
    names = dict.fromkeys(f"{base}{suffix}" for suffix in SUFFIXES for base in (slide_stem(slide), slide.name))
    return [folder / name for name in names]


def read_annotations_map(map_csv: str | Path, slides: list[Path]) -> dict[str, Path]:
    """{slide name: annotation file} from the CSV (see the module docstring)."""
    map_csv = Path(map_csv)
    by_name = {slide_stem(p): slide_stem(p) for p in slides}
    by_name.update({p.name: slide_stem(p) for p in slides if p.name not in by_name})
    try:
        with open(map_csv, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"--annotations-map {map_csv}: not readable as CSV ({exc})") from exc
    table: dict[str, Path] = {}
    first = True
    for line, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if first and cells[0].lower() == "slide":
            first = False
            continue  # header
        first = False
        where = f"--annotations-map {map_csv}, line {line}"
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise InputError(f"{where}: {row}: expected two cells 'slide,annotation-file'")
        name = by_name.get(cells[0])
        if name is None:
            known = sorted(slide_stem(p) for p in slides)
            raise InputError(
                f"{where}: slide {cells[0]!r} is not among --slides ({len(known)} slide(s): "
                f"{', '.join(known[:5])}{', ...' if len(known) > 5 else ''}); correct the name "
                f"or remove the row"
            )
        if name in table:
            raise InputError(f"{where}: slide {name!r} is named a second time; keep one row per slide")
        path = Path(cells[1]).expanduser()
        path = path if path.is_absolute() else map_csv.parent / path
        if not path.is_file():
            raise InputError(f"{where}: annotation file {path} of slide {name!r} does not exist")
        table[name] = path
    return table


def find_annotation_files(
    slides: list[Path], folder: str | Path | None, map_csv: str | Path | None, listed: list[Path] | None = None
) -> dict[str, Path | None]:
    """{slide name: its annotation file} of ``slides``; all None when neither flag is given.
    ``listed``: every slide of --slides (a map row may name one that cannot be opened)."""
    if folder is None and map_csv is None:
        return {slide_stem(p): None for p in slides}
    if folder is not None and not Path(folder).is_dir():
        raise InputError(f"--annotations {folder}: no such folder")
    mapped = read_annotations_map(map_csv, listed or slides) if map_csv is not None else {}
    found: dict[str, Path | None] = {}
    missing = []
    for slide in slides:
        name = slide_stem(slide)
        if name in mapped:
            found[name] = mapped[name]
            continue
        if folder is None:
            missing.append(f"{name} (no row in --annotations-map {map_csv})")
            continue
        present = [p for p in candidates(Path(folder), slide) if p.is_file()]
        if len(present) > 1:
            raise InputError(
                f"slide {slide}: more than one annotation file: {', '.join(map(str, present))}; "
                f"remove or rename all but one, or name the file in --annotations-map"
            )
        if not present:
            looked = " or ".join(p.name for p in candidates(Path(folder), slide))
            missing.append(f"{name} (no {looked} in --annotations {folder})")
            continue
        found[name] = present[0]
    if missing:
        raise InputError(
            f"no annotations for slide(s): {'; '.join(missing)}; export them from QuPath, or remove "
            f"the slide(s) from --slides"
        )
    return found
