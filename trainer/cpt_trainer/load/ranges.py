"""Byte ranges of files on any fsspec store: `pread` on local files, ranged GETs on object
stores. Every read is counted, by the reader and for the whole process (`total_read`), so a load
can say how many bytes it cost."""
from __future__ import annotations

import os

import fsspec
import torch

from ..errors import Refused


_TOTAL = [0]


def total_read() -> int:
    """Bytes read through any `Ranges` of this process so far."""
    return _TOTAL[0]


class Ranges:
    def __init__(self, uri: str):
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.bytes_read = 0

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def read(self, path: str, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of `path` (a full path under this store); short only at EOF."""
        if self.local:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), end - start, start)
        else:
            data = bytes(self.fs.cat_file(path, start=start, end=end))
        self._count(len(data))
        return data

    def read_into(self, path: str, start: int, buffer: torch.Tensor) -> None:
        """Fill a contiguous CPU tensor's bytes from `path` at `start`, or refuse a short file."""
        # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it is a buffer on 3.11 too
        view = memoryview(buffer.view(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
        if self.local:
            with open(path, "rb") as f:
                done = 0
                while done < len(view):
                    n = os.preadv(f.fileno(), [view[done:]], start + done)
                    if n <= 0:
                        break
                    done += n
        else:
            data = self.fs.cat_file(path, start=start, end=start + len(view))
            done = len(data)
            view[:done] = data
        self._count(done)
        if done != len(view):
            raise Refused(f"{path} ends before byte {start + len(view)}: a truncated file")

    def _count(self, n: int) -> None:
        self.bytes_read += n
        _TOTAL[0] += n

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def listing(self) -> list[str]:
        return sorted(self.fs.ls(self.root, detail=False))


__all__ = ["Ranges"]
