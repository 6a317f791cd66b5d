"""The tar writer of the shards and the pseudo-mask chunks, from the standard library.

It writes the bytes webdataset's ``TarWriter(fileobj, encoder=False, mtime=...)`` writes
(members in sorted key order, named ``<key>.<member>``, mode 0444, owner "bigdata", the
fixed mtime, tarfile's default format; tests/test_shards.py compares the two), so writing
shards and masks needs no webdataset: a GPU node image without it runs every stage.
"""

from __future__ import annotations

import io
import tarfile


class TarWriter:
    def __init__(self, fileobj, mtime: float = 0.0, user: str = "bigdata", group: str = "bigdata", mode: int = 0o0444):
        self.tarstream = tarfile.open(fileobj=fileobj, mode="w|")
        self.mtime, self.user, self.group, self.mode = mtime, user, group, mode

    def write(self, sample: dict) -> int:
        """Write ``sample`` = {"__key__": key, member: bytes, ...}; returns the bytes stored."""
        if "__key__" not in sample:
            raise ValueError("sample must contain a __key__")
        key, total = sample["__key__"], 0
        for name in sorted(sample):
            if name.startswith("_"):
                continue
            value = sample[name]
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {key}: member {name} is {type(value).__name__}, not bytes")
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(value), self.mtime, self.mode
            info.uname, info.gname = self.user, self.group
            self.tarstream.addfile(info, io.BytesIO(value))
            total += info.size
        return total

    def close(self) -> None:
        self.tarstream.close()
