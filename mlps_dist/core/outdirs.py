"""Output folders that never clobber inputs or someone else's files.

    claim_output_dir(out, inputs=[src], tool="make_shards", force=args.force)

Refuses (InputError, exit 2) when ``out`` is one of the inputs, lies inside one, or holds
one; and when ``out`` already holds files but was not written by this project (no
``.mlps-output`` marker), unless ``force``. Then writes the marker, so a rerun into the
same folder (to resume or refresh it) is accepted without ``--force``.
"""

from __future__ import annotations

from pathlib import Path

from mlps_dist.core.errors import InputError
from mlps_dist.core.fileio import atomic_write_text

MARKER = ".mlps-output"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_overlapping(
    out: Path, inputs: list[str | Path], out_flag: str = "--out", in_flag: str = "--input"
) -> None:
    out_r = out.resolve()
    for item in inputs:
        src = Path(item).resolve()
        folder = src if src.is_dir() or not src.exists() else src.parent
        if _inside(out_r, folder) and (src.is_dir() or out_r == folder):
            raise InputError(
                f"{out_flag} {out} lies inside the input {in_flag} {item}: the outputs would mix with "
                f"(or replace) the inputs; choose a folder outside it"
            )
        if _inside(src, out_r):
            raise InputError(
                f"{out_flag} {out} holds the input {in_flag} {item}: writing there could replace "
                f"your files; choose another folder"
            )


def force_hint(force: bool | None, what: str) -> str:
    """The end of a refusal: ', or pass --force WHAT' where the tool has that flag."""
    return "" if force is None else f", or pass --force {what}"


def claim_output_dir(
    out: str | Path,
    inputs: list[str | Path],
    tool: str,
    force: bool | None = None,
    owned_if: tuple[str, ...] = (),
    out_flag: str = "--out",
    in_flag: str = "--input",
) -> Path:
    """Check ``out`` (see the module docstring), create it and mark it as ours. ``force``: the
    tool's --force flag; None for a tool without one (its refusals then offer none)."""
    out = Path(out)
    check_not_overlapping(out, inputs, out_flag, in_flag)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out_flag} {out} is a file; give a folder")
    if out.is_dir() and not force:
        ours = (out / MARKER).is_file() or any((out / name).exists() for name in owned_if)
        if not ours and any(not p.name.startswith(".lock") for p in out.iterdir()):  # a lock alone: empty
            raise InputError(
                f"{out_flag} {out} is not empty and was not written by {tool}; choose an empty or "
                f"new folder" + force_hint(force, "to write into it anyway")
            )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_text(out / MARKER, f"{tool}\n")
    return out
