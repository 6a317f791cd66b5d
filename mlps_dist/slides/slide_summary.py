"""What segment_slides records about a run: summary.json's run, checkpoint and stain
entries, and OUT/summary.csv (a row per slide: areas, error, then the run, checkpoint and
settings that made it). Torch-free."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mlps_dist.core.fileio import atomic_write_text


def run_label(args) -> str:
    return str(args.model or args.run)


def checkpoint_label(args) -> str:
    return "export" if args.model else args.checkpoint


def stain_summary(model, meta: dict, args) -> dict | None:
    """summary.json ``stain``: None without stain normalisation, else the slide's record."""
    normaliser = getattr(model, "stain", None)
    if normaliser is None:
        return None
    if args.stain_scope == "tile":
        return {"method": normaliser.method, "scope": "tile", "reason": "--stain-scope tile"}
    return meta.get("stain")


SETTING_COLUMNS = (
    "run",
    "checkpoint",
    "model",
    "stride",
    "patch_size",
    "model_mpp",
    "slide_mpp",
    "gate",
    "stain_scope",
    "simplify",
    "min_region_um2",
    "probabilities",
)


def run_settings(args, settings: dict, fingerprint: str) -> dict:
    """The run, checkpoint and settings of this invocation, for summary.csv's last columns."""
    return {
        "run": run_label(args),
        "checkpoint": checkpoint_label(args),
        "model": fingerprint,
        "gate": "fixed by export" if args.model else ("off" if args.no_gate else "run's setting"),
        "stain_scope": settings.get("stain_scope", "none"),
        **{
            k: settings[k] for k in ("stride", "patch_size", "model_mpp", "simplify", "min_region_um2", "probabilities")
        },
        "slide_mpp": "" if settings["slide_mpp"] is None else settings["slide_mpp"],
    }


def write_summary_csv(
    out: Path, names: list[str], bad: dict[str, str], classes: list[str], used: dict | None = None
) -> None:
    """A row per slide: areas, then the error (failed slides), then the run and settings
    that made it (every row: a slide is reused only when made with the same ones)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    used = used or {}
    tail = [used.get(k, "") for k in SETTING_COLUMNS]
    writer.writerow(
        ["slide", "status", "width", "height", "mpp", "map_mpp", "tissue_mm2"]
        + [f"{c}_mm2" for c in classes]
        + ["error", *SETTING_COLUMNS]
    )
    for name in names:
        path = out / name / "summary.json"
        if name not in bad and path.is_file():
            s = json.loads(path.read_text())
            writer.writerow(
                [name, "ok", s["width"], s["height"], s["mpp"], s["map_mpp"], s["tissue_mm2"]]
                + [s["area_mm2"].get(c, 0) for c in classes]
                + ["", *tail]
            )
        else:
            writer.writerow([name, "failed"] + [""] * (5 + len(classes)) + [bad.get(name, "not finished"), *tail])
    atomic_write_text(out / "summary.csv", buf.getvalue())
