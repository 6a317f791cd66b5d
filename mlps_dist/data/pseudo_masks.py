"""Pseudo-mask store: chunked shards with atomic commit, a manifest, and a keyed reader.

    RUN/pseudo_masks/<split>/masks-NNNNNN.tar   samples [N*chunk_size, (N+1)*chunk_size) of the split,
                                                members KEY.<layer>.png (8-bit class indices,
                                                C = ignore/white), keys identical to the input keys
    RUN/pseudo_masks/<split>/masks-NNNNNN.idx   DALI webdataset index of the tar
    RUN/pseudo_masks/<split>/masks-NNNNNN.skipped.json   samples of that chunk replaced by
                                                all-ignore masks (only with masks.skip_bad)
    RUN/pseudo_masks/<split>/manifest.json      layers, chunk size, count, fingerprint, done chunks

A chunk is written as ``.tmp`` files; its index is renamed into place first and the tar
last, so a tar that exists is complete and a crash leaves at most ``.tmp`` debris, which
the next run deletes. The chunk grid depends only on ``chunk_size``, never on the world
size, so any number of ranks can resume any partial pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from mlps_dist.core import png, records
from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import atomic_write_text
from mlps_dist.data.shards import ShardWriter, TarFiles, check_index_fits, read_index, shard_stem

MANIFEST = "manifest.json"
CHUNK_PREFIX = "masks"  # chunk N is written as the shard N of a split named "masks" (ShardWriter)
FORMAT_VERSION = 1
_CHUNK_TAR = re.compile(r"^masks-(\d{6})\.tar$")


class PseudoMaskError(MlpsError, ValueError):
    """A pseudo-mask folder that does not fit the current run; the message says what to do."""


def chunk_stem(chunk: int) -> str:
    return shard_stem(CHUNK_PREFIX, chunk)


def num_chunks(count: int, chunk_size: int) -> int:
    return (count + chunk_size - 1) // chunk_size


def chunk_indices(chunk: int, chunk_size: int, count: int) -> range:
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, count))


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def write_json(path: str | Path, data: dict) -> None:
    """Atomic JSON write: a reader sees the old or the new file, never half of one."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


# ---------------------------------------------------------------- writing


def write_chunk(
    folder: str | Path,
    chunk: int,
    samples: list[tuple[str, list[bytes]]],
    layers: list[str],
    skipped: dict[str, str] | None = None,
) -> Path:
    """Commit one chunk: ``samples`` = [(key, [png per layer])] in index order; its
    ``skipped.json`` is written before the tar is committed."""
    folder = Path(folder)
    # mtime 0.0 (a float): the pax records every chunk has held (ShardWriter), reruns byte-identical.
    writer = ShardWriter(folder, CHUNK_PREFIX, chunk, members=[f"{layer}.png" for layer in layers], mtime=0.0)
    try:
        for key, pngs in samples:
            writer.write(key, {f"{layer}.png": data for layer, data in zip(layers, pngs)})
        if skipped:
            write_json(folder / f"{chunk_stem(chunk)}.skipped.json", skipped)
    except BaseException:
        writer.abort()
        raise
    writer.close()  # the index first, then the tar: the commit point
    return writer.tar_path


def committed_chunks(folder: str | Path) -> set[int]:
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    done = set()
    for name in os.listdir(folder):
        match = _CHUNK_TAR.match(name)
        if match and (folder / name.replace(".tar", ".idx")).is_file():
            done.add(int(match.group(1)))
    return done


def remove_debris(folder: str | Path) -> None:
    """Delete the ``.tmp`` files an interrupted run left behind."""
    for path in Path(folder).glob("*.tmp"):
        path.unlink(missing_ok=True)


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise PseudoMaskError(f"{path}: not valid JSON ({exc}); delete {Path(folder)} to start the pass over") from exc


def new_manifest(split: str, settings: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "split": split,
        "layers": settings["layers"],
        "chunk_size": settings["chunk_size"],
        "count": settings["count"],
        "num_chunks": num_chunks(settings["count"], settings["chunk_size"]),
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "done": [],
        "complete": False,
        "skipped": {},
    }


def check_manifest(folder: str | Path, manifest: dict, settings: dict, defaults: dict | None = None) -> None:
    """Refuse to mix masks from different classifiers or settings in one folder. ``defaults``
    (flat, dotted): the value of a setting that a manifest written before it existed counts as
    having (records.changed)."""
    changed = records.changed(manifest.get("settings", {}), settings, defaults)
    if changed:
        raise PseudoMaskError(
            f"{Path(folder)} holds pseudo masks made with different inputs (changed: {', '.join(changed)}); "
            f"they cannot be mixed. Delete {Path(folder)} to start the pass over with the current classifier "
            f"and masks config, or set run_dir to a new folder"
        )


def refresh_manifest(folder: str | Path, manifest: dict, complete: bool = False) -> dict:
    """Record the chunks committed on disk (and the samples skipped in them)."""
    folder = Path(folder)
    manifest["done"] = sorted(committed_chunks(folder))
    skipped = {}
    for chunk in manifest["done"]:
        path = folder / f"{chunk_stem(chunk)}.skipped.json"
        if path.is_file():
            skipped.update(json.loads(path.read_text()))
    manifest["skipped"] = dict(sorted(skipped.items()))
    manifest["complete"] = complete
    write_json(folder / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- reading


class PseudoMaskStore:
    """Random access to committed pseudo masks: ``read_pngs(index)`` -> one PNG per layer."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise PseudoMaskError(
                f"{self.folder / MANIFEST} does not exist: run the mask pass first (mlps stage masks CONFIG RUN)"
            )
        self.manifest = manifest
        self.layers: list[str] = list(manifest["layers"])
        self.chunk_size = int(manifest["chunk_size"])
        self.count = int(manifest["count"])
        self.complete = bool(manifest.get("complete", False))
        self._where: dict[int, tuple[int, dict[str, tuple[int, int]]]] = {}
        for chunk in sorted(committed_chunks(self.folder)):
            idx, tar = self.folder / f"{chunk_stem(chunk)}.idx", self.folder / f"{chunk_stem(chunk)}.tar"
            entries = read_index(idx)
            check_index_fits(entries, tar, idx)
            for key, members in entries:
                self._where[int(key.rsplit("_", 1)[-1])] = (chunk, members)
        self._files = TarFiles()

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, n: int) -> list[int]:
        return [i for i in range(n) if i not in self._where]

    def read_pngs(self, index: int) -> list[bytes]:
        if index not in self._where:
            raise PseudoMaskError(
                f"{self.folder}: no pseudo masks for sample {index}; "
                f"rerun the mask pass to complete it (mlps stage masks CONFIG RUN)"
            )
        chunk, members = self._where[index]
        tar = self.folder / f"{chunk_stem(chunk)}.tar"
        return [self._files.read(tar, *members[f"{layer}.png"]) for layer in self.layers]

    def read_masks(self, index: int) -> np.ndarray:
        """(L, H, W) uint8, layers in ``.layers`` order."""
        return np.stack([png.decode(data) for data in self.read_pngs(index)])

    def close(self) -> None:
        self._files.close()
