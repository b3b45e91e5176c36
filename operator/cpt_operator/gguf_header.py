"""Read a GGUF file's header (key/values and tensor names) from a stream, and nothing else.

The `gguf` package's GGUFReader memory-maps the whole file; through fsspec on S3 that means
downloading a 100+ GB base to learn six integers. This parser reads the header sequentially
(a few MB: the vocabulary array is the bulk of it), so an object store serves it with a few
range reads of fsspec's read-ahead blocks, and it stops before the tensor data.

Layout (GGUF v2/v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 key/value
count; each key/value is a string key, a u32 value type and the value (arrays: u32 element type,
u64 length, elements); then per tensor: string name, u32 dimension count, u64 dimensions, u32
type, u64 offset. Strings are a u64 length and UTF-8 bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import IO, Any

MAX_HEADER_BYTES = 256 << 20
"""A header is a few MB; anything this large is not a GGUF header (or not one we can plan from)."""

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    """Not a readable GGUF header."""


@dataclass(frozen=True, slots=True)
class GgufArray:
    """An array value: only its element type and length are kept."""

    type: int
    length: int


@dataclass
class GgufHeader:
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[str] = field(default_factory=list)


class _Reader:
    def __init__(self, stream: IO[bytes]):
        self.stream, self.read_bytes = stream, 0

    def take(self, n: int) -> bytes:
        if self.read_bytes + n > MAX_HEADER_BYTES:
            raise GgufError(f"header larger than {MAX_HEADER_BYTES >> 20} MiB")
        data = self.stream.read(n)
        if len(data) != n:
            raise GgufError("file ends inside the header")
        self.read_bytes += n
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, type_: int) -> Any:
        if type_ in _SCALARS:
            return self.scalar(_SCALARS[type_])
        if type_ == _STRING:
            return self.string()
        if type_ == _ARRAY:
            return self.array()
        raise GgufError(f"unknown value type {type_}")

    def array(self) -> GgufArray:
        type_, length = self.scalar("<I"), self.scalar("<Q")
        if type_ in _SCALARS:  # fixed size: skip without decoding
            self.take(length * struct.calcsize(_SCALARS[type_]))
        else:
            for _ in range(length):
                self.value(type_)
        return GgufArray(type_, length)

    def tensor_name(self) -> str:
        name = self.string()
        self.take(8 * self.scalar("<I") + 4 + 8)  # dimensions, type, offset
        return name


def read_header(stream: IO[bytes]) -> GgufHeader:
    """Key/values and tensor names of the GGUF file at the stream's start."""
    r = _Reader(stream)
    if r.take(4) != b"GGUF":
        raise GgufError("not a GGUF file (no GGUF magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_fields = r.scalar("<Q"), r.scalar("<Q")
    header = GgufHeader()
    for _ in range(n_fields):
        key = r.string()
        header.fields[key] = r.value(r.scalar("<I"))
    header.tensors = [r.tensor_name() for _ in range(n_tensors)]
    return header
