"""What a slide's saved work depends on, so segment_slides and tile_slides reuse it only when
it would come out the same.

    key = work_key(slide_path, {"map_mpp": 8.0, "stride": 16, ...}, model_fingerprint)
    key_digest(key)        # 16 hex digits, in file names and records

A key holds the slide file's size and mtime_ns (and those of a MIRAX slide's data folder
files), every setting that shapes the result, and the model's fingerprint: the sha256 of
the run's config and model files (``run_fingerprint``) or of the export (``export_fingerprint``).
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlps_dist.core import layout
from mlps_dist.core.fileio import sha256_file


def file_stamp(path: str | Path) -> list:
    """[size, mtime_ns] of a file (a folder: of every file inside, sorted by name)."""
    path = Path(path)
    if path.is_dir():
        return [[str(p.relative_to(path)), *file_stamp(p)] for p in sorted(path.rglob("*")) if p.is_file()]
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def slide_stamp(path: str | Path) -> dict:
    path = Path(path)
    stamp = {"file": path.name, "stamp": file_stamp(path)}
    data = path.with_suffix("")
    if data.is_dir():  # MIRAX: X.mrxs + X/ with the pixel data
        stamp["data"] = file_stamp(data)
    return stamp


def content_stamp(path: str | Path | None) -> list | None:
    """[size, sha256] of a small input file (a GeoJSON), None for none."""
    if path is None:
        return None
    return [Path(path).stat().st_size, sha256_file(path)]


def run_fingerprint(run_dir: str | Path, checkpoint: str, gate: bool | None) -> str:
    """Digest of what a run predicts with: its resolved config files and model files."""
    run = Path(run_dir)
    parts = {"checkpoint": checkpoint, "gate": gate}
    for path in layout.prediction_files(run):
        if path.is_file():
            parts[layout.relative(run, path)] = sha256_file(path)  # keyed as before: saved work stays valid
    return key_digest(parts)


def export_fingerprint(model_path: str | Path) -> str:
    model = Path(model_path)
    parts = {"model.onnx": sha256_file(model)}
    if (model.parent / "model.json").is_file():
        parts["model.json"] = sha256_file(model.parent / "model.json")
    return key_digest(parts)


def work_key(slide_path: str | Path, settings: dict, model: str) -> dict:
    return json.loads(json.dumps({"slide": slide_stamp(slide_path), "settings": settings, "model": model}))


def key_digest(key) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def changed(old: dict | None, new: dict) -> list[str]:
    """Names of the parts of a key that differ (for messages)."""
    if not isinstance(old, dict):
        return ["(no record)"]
    names = []
    for part in ("slide", "model"):
        if old.get(part) != new.get(part):
            names.append(part)
    old_s, new_s = old.get("settings") or {}, new.get("settings") or {}
    names += sorted(k for k in set(old_s) | set(new_s) if old_s.get(k) != new_s.get(k))
    return names
