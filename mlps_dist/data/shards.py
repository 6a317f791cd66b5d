"""Shard format: WebDataset tars with DALI index files, and a random-access reader.

    root/info.json                       classes, palette, ignore index, per-split shard list
    root/<split>-NNNNNN.tar              members KEY.png (or .webp/.jpg, see encoding.py), KEY.labels,
                                         KEY.json[, KEY.mask.png]
    root/<split>-NNNNNN.idx              DALI webdataset index ("v1.2 <samples>", then per sample
                                         "<ext> <data offset> <size> <member name>" repeated)

Keys are ``<split>_<index:08d>`` with ``index`` the sample's position in the split, so a key
names its global position. The reader reads a member straight from the offsets of the index
file; file handles are opened lazily per process, so a reader may be pickled into DataLoader
worker processes, and reads are positional, so threads may share one.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np

from mlps_dist.core.errors import MlpsError
from mlps_dist.core.fileio import atomic_write_text, commit_file
from mlps_dist.data.encoding import image_member

FORMAT_VERSION = 1
INDEX_VERSION = "v1.2"
MEMBERS = ("png", "webp", "jpg", "labels", "json", "mask.png")  # one image member (encoding.py)


class ShardError(MlpsError, ValueError):
    """A shard folder that cannot be read as written by mlps shards."""


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def shard_stem(split: str, shard_number: int) -> str:
    return f"{split}-{shard_number:06d}"


def encode_labels(multi_hot) -> bytes:
    """C bytes of 0/1: fixed size, so DALI can read them as a uint8 tensor."""
    return bytes(int(bool(v)) for v in multi_hot)


def decode_labels(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).astype(np.float32)


# ---------------------------------------------------------------- DALI index files


def index_entries(tar_path: str | Path) -> list[list[tuple[str, int, int, str]]]:
    """Per sample, its members as (ext, data offset, size, member name), in tar order.

    The sample name is the member name up to the first dot (as DALI splits it), so
    ``KEY.mask.png`` has the extension ``mask.png``.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, _, ext = member.name.partition(".")
            if base != last:
                samples.append([])
                last = base
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    return samples


def write_index(tar_path: str | Path, idx_path: str | Path) -> int:
    samples = index_entries(tar_path)
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for members in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in members))
    atomic_write_text(idx_path, "\n".join(lines) + "\n")
    return len(samples)


def read_index(idx_path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] from a v1.2 index; raises ShardError when malformed."""
    idx_path = Path(idx_path)
    try:
        lines = idx_path.read_text().splitlines()
        version, count = lines[0].split()
        if version != INDEX_VERSION:
            raise ValueError(f"version {version!r}, expected {INDEX_VERSION}")
        out = []
        for line in lines[1 : 1 + int(count)]:
            parts = line.split(" ")
            members, key = {}, None
            for i in range(0, len(parts), 4):
                ext, off, size, name = parts[i : i + 4]
                key = name.partition(".")[0]
                members[ext] = (int(off), int(size))
            out.append((key, members))
        if len(out) != int(count):
            raise ValueError(f"header says {count} samples, found {len(out)}")
        return out
    except (OSError, ValueError, IndexError) as exc:
        raise ShardError(f"{idx_path}: not a readable DALI index ({exc}); rerun mlps shards") from exc


# ---------------------------------------------------------------- writing


IMAGE_MEMBERS = ("png", "webp", "jpg")


class ShardWriter:
    """Writes one shard atomically: the index of ``.tar.tmp`` is committed as ``.idx`` first,
    then ``.tar.tmp`` is fsynced and renamed to ``.tar`` (the commit point). A kill in between
    leaves a new index beside an old or absent tar, which readers reject (index entries are
    checked against the tar's size) and the writer's caller rewrites.

    It writes the shards (``<split>-NNNNNN``) and the pseudo-mask chunks (pseudo_masks.py:
    ``masks-NNNNNN``, members ``<layer>.png``). ``members``: the member names allowed.
    ``mtime``: every member's; chunks have always been written with the float ``0.0``, for
    which tarfile adds a pax ``mtime`` record to each member (shards, with the int 0, have
    none): each keeps its own, so that both stay byte-identical to what earlier runs wrote.
    """

    def __init__(self, root: str | Path, split: str, shard_number: int, members=MEMBERS, mtime: float = 0):
        from mlps_dist.data.tarwriter import TarWriter

        self.root = Path(root)
        self.members = tuple(members)
        stem = shard_stem(split, shard_number)
        self.tar_path = self.root / f"{stem}.tar"
        self.idx_path = self.root / f"{stem}.idx"
        self._tmp = self.root / f"{stem}.tar.{os.getpid()}.tmp"
        self._tmp.unlink(
            missing_ok=True
        )  # a leftover of a dead process with our pid (removes a link, never its target)
        # O_EXCL | O_NOFOLLOW: never writes through a symlink planted under the temporary name.
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        self._file = os.fdopen(fd, "wb")
        # Fixed mtime: identical inputs give byte-identical shards.
        self._writer = TarWriter(self._file, mtime=mtime)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "image" in members and any(m in members for m in IMAGE_MEMBERS):
            # SplitReader.read adds "image" as an alias of the stored encoding: a read sample
            # can be written back as it is.
            members = {k: v for k, v in members.items() if k != "image"}
        unknown = set(members) - set(self.members)
        if unknown:
            raise ValueError(f"sample {key}: unknown members {sorted(unknown)}; allowed: {self.members}")
        try:
            self._writer.write({"__key__": key, **members})
        except OSError as exc:
            if exc.filename or not exc.errno:
                raise
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(self.tar_path)) from exc  # named
        self.count += 1

    def close(self) -> dict:
        self._writer.close()
        if not self._file.closed:
            self._file.close()
        write_index(self._tmp, self.idx_path)
        commit_file(self._tmp, self.tar_path)
        return {"tar": self.tar_path.name, "idx": self.idx_path.name, "count": self.count}

    def abort(self) -> None:
        """Drop the partial shard; never raises (a full disk fails the flush as well)."""
        try:
            self._writer.close()  # flushes into the .tmp that is deleted below
        except OSError:
            pass
        finally:
            try:
                self._file.close()
            except OSError:
                pass
            finally:
                self._tmp.unlink(missing_ok=True)


def shard_tmp_files(root: str | Path, stems=None) -> list[Path]:
    """Temporary files a ShardWriter left in ``root`` (``STEM.tar.tmp``, ``STEM.tar.PID.tmp``),
    of the given stems only when ``stems`` is given; nothing else ending in .tmp."""
    import re

    pattern = re.compile(r"^(?P<stem>.+-\d{6})\.tar(\.\d+)?\.tmp$")
    found = []
    for path in Path(root).glob("*.tmp"):
        m = pattern.match(path.name)
        if m and (stems is None or m.group("stem") in stems):
            found.append(path)
    return sorted(found)


def write_info(root: str | Path, info: dict) -> None:
    atomic_write_text(Path(root) / "info.json", json.dumps(info, indent=1))


# ---------------------------------------------------------------- reading


def read_info(root: str | Path) -> dict:
    path = Path(root) / "info.json"
    if not path.is_file():
        raise ShardError(
            f"{path} does not exist: data.root must be a folder written by mlps shards "
            f"(convert the dataset first, or fix data.root)"
        )
    try:
        info = json.loads(path.read_text())
    except ValueError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc}); rerun mlps shards") from exc
    if info.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {info.get('format')!r}, this code reads format {FORMAT_VERSION}")
    return info


def train_image_size(info: dict | None) -> list[int] | None:
    """The size of every training patch as info.json records it, or None when the split holds
    patches of mixed sizes (or the record has no train split)."""
    return ((info or {}).get("splits", {}).get("train", {}) or {}).get("image_size") or None


class TarFiles:
    """Read handles to tar files, opened on first use and private to one process: a reader
    forked or pickled into DataLoader workers never shares a file with its parent.

    Reads are positional (``os.pread``): no handle has a file offset that two threads could
    move under each other. A loader's prefetch thread and the training thread, or DALI's
    source callback and a caller, may read through the same reader at the same time."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def read(self, path: Path, offset: int, size: int) -> bytes:
        fd = self._fds.get(path) if self._pid == os.getpid() else None
        if fd is None:
            fd = self._open(path)
        chunks, done = [], 0
        while done < size:  # pread may return less than asked; only an empty read means the end
            chunk = os.pread(fd, size - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def _open(self, path: Path) -> int:
        if self._pid != os.getpid():  # a forked child: the parent's descriptors and lock are not its own
            self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def close(self) -> None:
        if self._pid != os.getpid():  # a forked child holds only the parent's descriptors
            self._fds = {}
            return
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __getstate__(self):
        return {"_pid": self._pid}

    def __setstate__(self, state):
        self._fds, self._pid, self._lock = {}, state["_pid"], threading.Lock()


class SplitReader:
    """Random access to the samples of one split; ``read(i)`` -> {member: bytes}."""

    def __init__(self, root: str | Path, split: str, info: dict):
        self.root = Path(root)
        self.split = split
        self.info = info
        self.split_info = info["splits"][split]
        self.classes: list[str] = list(info["classes"])
        self.num_classes = len(self.classes)
        self.ignore_index: int = int(info["ignore_index"])
        self.has_masks: bool = bool(self.split_info["has_masks"])
        if "image_format" not in self.split_info:
            raise ShardError(
                f"{self.root / 'info.json'}: split '{split}' records no image_format (shards of an older "
                f"release of mlps-dist); rebuild them with mlps shards"
            )
        self.image_format: str = self.split_info["image_format"]
        self.image_member: str = image_member(self.image_format)
        self._entries: list[tuple[int, dict[str, tuple[int, int]]]] = []  # (shard, members)
        self._keys: list[str] = []
        self._tars: list[Path] = []
        for shard_no, shard in enumerate(self.split_info["shards"]):
            tar = self.root / shard_file_name(self.root, shard, "tar")
            if not tar.is_file():
                raise ShardError(f"{tar} is listed in {self.root / 'info.json'} but missing; rerun mlps shards")
            entries = read_index(self.root / shard_file_name(self.root, shard, "idx"))
            if len(entries) != shard["count"]:
                raise ShardError(f"{self.root / shard['idx']}: {len(entries)} samples, info.json says {shard['count']}")
            check_index_fits(entries, tar, self.root / shard["idx"])
            self._tars.append(tar)
            for key, members in entries:
                expected = sample_key(split, len(self._keys))
                if key != expected:  # keys name files (inspect_shards --dump): never a path from the idx
                    raise ShardError(
                        f"{self.root / shard['idx']}: sample {len(self._keys)} has key {key[:80]!r}, "
                        f"expected {expected!r}; the shard was not written by mlps shards "
                        f"or was changed since: rerun it"
                    )
                self._keys.append(key)
                self._entries.append((shard_no, members))
        if len(self._keys) != self.split_info["count"]:
            raise ShardError(
                f"{self.root}: split '{split}' has {len(self._keys)} samples, info.json says {self.split_info['count']}"
            )
        self._files = TarFiles()

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, i: int) -> str:
        return self._keys[i]

    def location(self, i: int) -> str:
        """``TAR: sample KEY``, for messages about one sample."""
        return f"{self._tars[self._entries[i][0]]}: sample {self._keys[i]}"

    def read(self, i: int) -> dict[str, bytes]:
        shard_no, members = self._entries[i]
        out = {}
        for ext, (offset, size) in members.items():
            data = self._files.read(self._tars[shard_no], offset, size)
            if len(data) != size:
                raise ShardError(
                    f"{self._tars[shard_no]}: truncated at member {self._keys[i]}.{ext}; rerun mlps shards"
                )
            out[ext] = data
        if self.image_member in out:
            out["image"] = out[self.image_member]  # the encoded image, whatever its format
        return out

    def labels(self, i: int) -> np.ndarray:
        return decode_labels(self.read(i)["labels"])

    def close(self) -> None:
        self._files.close()


def shard_file_name(root: Path, shard: dict, kind: str) -> str:
    """The ``tar``/``idx`` name of an info.json shard entry: a plain file name inside the
    folder (no path separators, no "..", no hidden files), so that a damaged or hostile
    info.json cannot make a reader open files elsewhere."""
    name = shard.get(kind) if isinstance(shard, dict) else None
    if (
        not isinstance(name, str)
        or not name
        or name != Path(name).name
        or name.startswith(".")
        or "\\" in name
        or not name.endswith(f".{kind}")
    ):
        raise ShardError(
            f"{root / 'info.json'}: shard {kind} name {name!r} is not a plain '*.{kind}' file name "
            f"inside {root}; rerun mlps shards"
        )
    return name


def check_index_fits(entries: list[tuple[str, dict[str, tuple[int, int]]]], tar: Path, idx: Path) -> None:
    """Every member the index lists must lie inside the tar (a stale index beside a newer
    tar, or a damaged one, would otherwise fail mid-epoch with MemoryError or EINVAL)."""
    tar_size = tar.stat().st_size
    for key, members in entries:
        for ext, (offset, size) in members.items():
            if offset < 0 or size < 0 or offset + size > tar_size:
                raise ShardError(
                    f"{idx}: member {key}.{ext} at bytes {offset}..{offset + size} lies outside "
                    f"{tar} ({tar_size} bytes): the index does not belong to this tar; "
                    f"rerun mlps shards"
                )


def open_split(root: str | Path, split: str) -> SplitReader:
    info = read_info(root)
    if split not in info.get("splits", {}):
        raise ShardError(f"{Path(root) / 'info.json'} has no split '{split}' (it has {sorted(info.get('splits', {}))})")
    return SplitReader(root, split, info)
