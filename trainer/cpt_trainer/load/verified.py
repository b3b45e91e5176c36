"""Streamed, verified restores: DCP reads a checkpoint's shards straight from the store, each
rank only the byte ranges it holds, and every byte is checked before torch sees it.

A checkpoint lists the sha256 of every fixed-size block of every file (`blocks.json`, itself
listed in the manifest; `api.manifest.block_size_for` picks each file's block size).
`VerifiedFile` serves reads from whole blocks: it fetches the blocks a read touches (a ranged
GET on object stores, `pread` on local files), compares each with the table and keeps the last
few for the reads that follow. A rank restoring on N ranks thus reads about 1/N of the
checkpoint and hashes what it reads, once, instead of downloading and hashing every file first;
DCP's pickled `.metadata` is verified like any file before it is unpickled. Saves put what every
rank reads (replicated scalars, hyperparameters) at the front of rank 0's files
(`checkpointer.py`), so those cost a block or two, not one block per parameter.

Checkpoints written before block tables have none: `CheckpointSource` then falls back to the
verified node copy (`checkpoint.fetch`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import posixpath
from collections import OrderedDict
from collections.abc import Generator
from contextlib import contextmanager
from typing import IO, Any

from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from cpt_api.manifest import BLOCKS, BlockTable, Manifest

from ..errors import Refused
from .ranges import Ranges

log = logging.getLogger(__name__)

_KEPT_BLOCKS = 4


class CorruptCheckpoint(Refused):
    """A block of a checkpoint file does not match its recorded digest."""


class Blocks:
    """A checkpoint's files, read by verified block."""

    def __init__(self, uri: str, manifest: Manifest, table: BlockTable):
        self.uri, self.table, self.ranges = uri, table, Ranges(uri)
        self.sizes = {rel: entry.size for rel, entry in manifest.files.items()}
        self._kept: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def block(self, rel: str, i: int) -> bytes:
        """Block i of `rel`, verified; the last few are kept for the next item, which may begin
        in the block where this one ends (DCP opens the file again for it)."""
        key = (rel, i)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        data = self._fetch(rel, i)
        self._kept[key] = data
        if len(self._kept) > _KEPT_BLOCKS:
            self._kept.popitem(last=False)
        return data

    def _fetch(self, rel: str, i: int) -> bytes:
        size, step = self.sizes[rel], self.table.files[rel].block_size
        data = self.ranges.read(self.ranges.path(rel), i * step, min(size, (i + 1) * step))
        want = self.table.files[rel].sha256[i]
        if hashlib.sha256(data).hexdigest() != want:
            raise CorruptCheckpoint(f"cannot restore from {self.uri}: block {i} of {rel} ({len(data)} "
                                    f"bytes at {i * step}) does not match its sha256 in {BLOCKS}")
        return data

    @property
    def bytes_read(self) -> int:
        return self.ranges.bytes_read


def open_blocks(uri: str, manifest: Manifest, copy: str | None = None) -> Blocks | None:
    """The checkpoint's verified block table, or None for a checkpoint written without one.
    `copy`: a local directory holding a copy of the checkpoint's top-level files to read the
    table from (this node already fetched it) instead of the store."""
    entry = manifest.files.get(BLOCKS)
    if entry is None:
        return None
    ranges = Ranges(copy or uri)
    data = ranges.read(ranges.path(BLOCKS), 0, entry.size + 1)  # one more: a longer file is wrong too
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptCheckpoint(f"cannot restore from {uri}: {BLOCKS} does not match the manifest")
    table = BlockTable.model_validate_json(data)
    missing = [rel for rel in manifest.files if rel != BLOCKS and rel not in table.files]
    if missing:
        raise CorruptCheckpoint(f"cannot restore from {uri}: {BLOCKS} lacks {', '.join(missing[:3])}")
    return Blocks(uri, manifest, table)


class VerifiedFile(io.RawIOBase):
    """A seekable, read-only view of one checkpoint file that only returns verified bytes."""

    def __init__(self, blocks: Blocks, rel: str):
        super().__init__()
        if rel not in blocks.sizes:
            raise FileNotFoundError(f"{rel} is not a file of checkpoint {blocks.uri}")
        self.blocks, self.rel, self.size, self.pos = blocks, rel, blocks.sizes[rel], 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.size, self.pos + len(view))
        done = 0
        while self.pos < end:
            i, at = divmod(self.pos, self.blocks.table.files[self.rel].block_size)
            data = self.blocks.block(self.rel, i)
            n = min(len(data) - at, end - self.pos)
            view[done:done + n] = data[at:at + n]
            done += n
            self.pos += n
        return done


class _VerifiedFiles(FileSystemBase):
    """DCP's file-system interface over `Blocks` (paths are relative to the checkpoint)."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        if mode != "rb":
            raise PermissionError("a checkpoint is immutable once committed")
        with VerifiedFile(self.blocks, str(path)) as stream:
            yield stream

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return posixpath.join(str(path), suffix)

    def init_path(self, path: str | os.PathLike[str], **kwargs: Any) -> str:
        return str(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        raise PermissionError("a checkpoint is immutable once committed")

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        raise PermissionError("a checkpoint is immutable once committed")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return str(path) in self.blocks.sizes

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        raise PermissionError("a checkpoint is immutable once committed")


class VerifiedReader(FileSystemReader):
    """DCP's own reader of one part (`model`, `optimizer`) over verified blocks."""

    def __init__(self, blocks: Blocks, part: str):
        super().__init__(part)
        # torch types `fs` as the FileSystem its __init__ assigns; the reader needs only FileSystemBase
        self.fs = _VerifiedFiles(blocks)  # type: ignore[assignment]
        self.path = part

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """DCP's reads in file order: items are written in one order and asked for in another,
        and a small item between two large ones would otherwise cost a block fetched twice."""
        def where(item: ReadItem) -> tuple[str, int]:
            info = self.storage_data[item.storage_index]
            return info.relative_path, info.offset

        return super().read_data(dataclasses.replace(plan, items=sorted(plan.items, key=where)), planner)

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        """One item's bytes, read front to back once: torch.load reads an item's zip directory
        at its end before its data, which would fetch the last block twice."""
        file.seek(sinfo.offset)
        return io.BytesIO(file.read(sinfo.length))


class CheckpointSource:
    """Where a restore reads a checkpoint's DCP parts from: the store, block-verified, or
    (for a checkpoint without a block table) the verified local copy in `directory`."""

    def __init__(self, uri: str, directory: str, blocks: Blocks | None, manifest: Manifest | None = None):
        self.uri, self.directory, self.blocks, self.manifest = uri, directory, blocks, manifest

    def reader(self, part: str) -> StorageReader:
        if self.blocks is None:
            return FileSystemReader(os.path.join(self.directory, part))
        return VerifiedReader(self.blocks, part)

    @property
    def bytes_read(self) -> int:
        """Bytes this rank read from the store for the DCP parts (0 for a local copy)."""
        return self.blocks.bytes_read if self.blocks is not None else 0


__all__ = ["Blocks", "CheckpointSource", "CorruptCheckpoint", "VerifiedFile", "VerifiedReader",
           "open_blocks"]
