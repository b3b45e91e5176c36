"""Where each tensor of an HF safetensors model lives, and reading a rank's rows of it.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, `data_offsets` relative to the end of the header), then the tensors' bytes in row-major
order. Only the headers are read to build the index (a few KiB a file, by range), so a 70B base
costs nothing until a rank asks for its rows. A sharded model (`model-0000x-of-0000y`) is every
`*.safetensors` file of the directory; the index JSON is not needed, the headers say it all.

Rows are contiguous, so the rows a rank holds under FSDP2 (Shard(0): rows `[o, o+n)` of every
parameter) are one byte range of the file. `read_rows` reads such a range in pieces of at most
`PIECE_BYTES`, converting each piece to the destination dtype, or straight into the destination
when the dtypes match: a rank's host memory while loading is its shard plus one piece.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from ..errors import Refused
from .ranges import Ranges

SUFFIX = ".safetensors"
PIECE_BYTES = 64 << 20
"""The largest read buffer when a piece must be converted (file dtype ≠ model dtype)."""
_HEADER_LIMIT = 100 << 20  # the format's own limit on the JSON header

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class Stored:
    """One tensor in a safetensors file: its type, shape and byte range in the file."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(1, self.rows)


class Index:
    """Tensor name -> `Stored`, over every safetensors file of a directory (any fsspec URL)."""

    def __init__(self, directory: str):
        self.files = Ranges(directory)
        paths = [p for p in self.files.listing() if p.endswith(SUFFIX)]
        if not paths:
            raise Refused(f"no {SUFFIX} files in {directory}")
        self.tensors: dict[str, Stored] = {}
        for path in paths:
            self.tensors.update(self._header(path))
        self.header_bytes = self.files.bytes_read

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (headers excluded): what this rank's load cost the store."""
        return self.files.bytes_read - self.header_bytes

    def _header(self, path: str) -> dict[str, Stored]:
        size = self.files.size(path)
        (length,) = struct.unpack("<Q", self.files.read(path, 0, 8).ljust(8, b"\0"))
        if length > min(_HEADER_LIMIT, size - 8):
            raise Refused(f"{path} is not a safetensors file (header length {length})")
        header = json.loads(self.files.read(path, 8, 8 + length))
        base, out = 8 + length, {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES or base + end > size:
                raise Refused(f"{path}: tensor {name} has dtype {entry['dtype']} or ends past the "
                              f"file ({base + end} > {size} bytes): a truncated or foreign file")
            out[name] = Stored(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), base + begin, base + end)
        return out

    def read_rows(self, stored: Stored, rows: range, out: torch.Tensor) -> None:
        """Rows `rows` of `stored` into `out` (`[len(rows), *stored.shape[1:]]`, any dtype or
        device), in pieces of at most PIECE_BYTES."""
        per_piece = max(1, PIECE_BYTES // max(1, stored.row_bytes))
        direct = out.dtype == stored.dtype and out.device.type == "cpu" and out.is_contiguous()
        for first in range(rows.start, rows.stop, per_piece):
            last = min(rows.stop, first + per_piece)
            target = out[first - rows.start:last - rows.start]
            start = stored.start + first * stored.row_bytes
            if direct:  # no buffer: the bytes land in the parameter itself
                self.files.read_into(stored.path, start, target)
                continue
            piece = torch.empty((last - first) * stored.row_bytes, dtype=torch.uint8)
            self.files.read_into(stored.path, start, piece)
            target.copy_(piece.view(stored.dtype).view(target.shape))


__all__ = ["DTYPES", "Index", "PIECE_BYTES", "Stored"]
