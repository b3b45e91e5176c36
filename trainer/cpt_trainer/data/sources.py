"""Reading sources through fsspec: listing, content hashes, units of work, documents.

A source URI is a local path, any fsspec URL (`s3://bucket/prefix/`, `memory://...`) or a glob
of either. A directory means every file below it. The listing is sorted, so every rank sees the
same files in the same order.

Units. A source is cut into units, pieces that can be read independently and in any order:
- `text`: a unit is one file, and the file is one document;
- `jsonl`: a unit is a byte range of a file (`unit_bytes`, 64 MiB by default). A range owns
  the lines that *start* inside it: its reader skips the tail of a line begun before it and
  reads its own last line to the end, wherever that is. A line is one record, its text
  `record[field]`; blank lines are not records. Instruction sources may carry `prompt` and
  `response` fields: the prompt is kept apart so packing can mask it out of the loss;
- `parquet`: a unit is one row group; a row is one record (column `field` or prompt/response).
Cutting needs only the listing (sizes) and Parquet footers (`SourceLayout`). The trainer reads
them once, on rank 0, and hands the same layout to every rank (`DataPipeline(share=...)`): a
listing or a footer read that fails on one rank only cannot give that rank another unit map
under the same data version. Which rank reads which unit is `positions.py`'s business.
A unit's documents come out in file order as a stream, one line / row group at a time; the
reader counts the bytes it pulls (`bytes_read`), so a rank's share of the I/O can be measured.

Unreadable input (binary files, invalid UTF-8, empty files, malformed or field-less JSON lines,
null Parquet cells, files that are not Parquet) is reported with file and line and skipped: one
bad file does not stop a run. A file the *store* cannot serve is another matter: a Parquet
footer or row group whose read fails with an I/O error (an S3 outage, a reset connection) is
tried again READ_TRIES times, backing off, and then fails the attempt naming the file
(`SourceReadError`), rather than becoming zero documents of a unit counted as done. A JSONL
line is located by its line number when its unit starts the file and by its byte offset
otherwise (counting lines would mean reading the whole prefix).

S3: endpoint and credentials come from the standard AWS environment (see
`cpt_api.storage`, shared with the operator).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from cpt_api.spec import DataSource, SourceFormat, SourceRole
from cpt_api.storage import storage_options

from .report import CurationReport, Origin
from .retries import SourceReadError, with_retries

_GLOB_CHARS = "*?["
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Document:
    text: str
    """The trainable text (for instruction records: the response)."""
    origin: Origin
    prompt: str = ""
    """Instruction prompt: packed before `text`, never in the loss."""

    @property
    def full_text(self) -> str:
        return self.prompt + self.text


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Full URL, protocol included (what reports show)."""
    size: int
    fingerprint: str
    """ETag where the store gives one, else sha256 of the content."""


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, str(path)


def list_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[SourceFile]]:
    """Every file the URI names, sorted by path, each with size and fingerprint."""
    fs, path = open_fs(uri)
    # fsspec reuses filesystem instances and s3fs caches listings in them: without this a
    # second pipeline in the same process could see an object's old ETag and size.
    fs.invalidate_cache()
    if any(c in path for c in _GLOB_CHARS):
        infos = fs.glob(path, detail=True)
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
    else:
        infos = {path: fs.info(path)}
    files = [(p, info) for p, info in sorted(infos.items()) if info.get("type") == "file"]
    return fs, [SourceFile(fs.unstrip_protocol(p), int(info.get("size") or 0),
                           _fingerprint(fs, p, info)) for p, info in files]


def _fingerprint(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    # Stores without an ETag (local files): hash the bytes. Size + mtime would be cheaper but
    # is not an identity: mtime ticks at the kernel's clock granularity (milliseconds), so a
    # file rewritten with the same length inside one tick would keep a stale data version.
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def content_hash(source: DataSource, files: list[SourceFile]) -> str:
    """sha256 over what decides the documents: format, fields and every file's identity."""
    digest = hashlib.sha256()
    digest.update(json.dumps([source.format.value, source.field, source.role.value]).encode())
    for f in files:
        digest.update(f"\n{f.path}\t{f.size}\t{f.fingerprint}".encode())
    return digest.hexdigest()


UNIT_BYTES = 64 << 20
"""Target size of a JSONL unit: big enough that the per-unit state stays small at 100B+ tokens
(thousands of units), small enough that hundreds of ranks each get many."""


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source."""

    file: int
    """Index into the source's sorted file listing."""
    start: int
    """jsonl: first byte of the range; parquet: row group; text: 0."""
    end: int
    """jsonl: end of the range (exclusive); parquet: row group + 1; text: the file's size."""


@dataclass(frozen=True)
class SourceLayout:
    """What a source's units are cut from: its files and, for Parquet, each file's row groups
    (0 for a file that is not Parquet: its one unit reports it when read)."""

    files: list[SourceFile]
    row_groups: list[int]


def read_layout(source: DataSource) -> SourceLayout:
    """List a source and read its Parquet footers (a missing source raises FileNotFoundError or
    finds no files; the store failing raises SourceReadError)."""
    # a source that does not exist is the spec's fault (the trainer refuses it), not the store's
    fs, files = with_retries(f"the listing of {source.uri}", lambda: list_files(source.uri),
                             passthrough=(FileNotFoundError,))
    groups = [_footer_row_groups(fs, f) for f in files] if source.format == SourceFormat.parquet else []
    return SourceLayout(files, groups)


def _footer_row_groups(fs: fsspec.AbstractFileSystem, file: SourceFile) -> int:
    import pyarrow.parquet as pq

    def read() -> int:
        with fs.open(file.path, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_row_groups)

    try:
        return with_retries(f"{file.path} (Parquet footer)", read)
    except SourceReadError:
        raise
    except Exception:  # pyarrow raises several types for a file that is not Parquet
        return 0


def cut_units(fmt: SourceFormat, files: list[SourceFile], row_groups: list[int],
              unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Every unit of a source, in listing order (a pure function of the listing)."""
    units = []
    for i, f in enumerate(files):
        if fmt == SourceFormat.jsonl:
            # An empty file is still one unit, so that reading it reports it.
            bounds = list(range(0, f.size, unit_bytes)) or [0]
            units += [Unit(i, b, min(b + unit_bytes, f.size)) for b in bounds]
        elif fmt == SourceFormat.parquet:
            units += [Unit(i, g, g + 1) for g in range(max(row_groups[i], 1))]
        else:
            units.append(Unit(i, 0, f.size))
    return units


class CountingFile:
    """A read-only file wrapper that counts the bytes handed out (pyarrow reads through it)."""

    def __init__(self, inner: Any, counter: list[int]):
        self.inner, self.counter = inner, counter

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.counter[0] += len(data)
        return bytes(data)

    def readline(self) -> bytes:
        line = self.inner.readline()
        self.counter[0] += len(line)
        return bytes(line)

    def __getattr__(self, name: str) -> Any:  # seek, tell, size, closed, ...
        return getattr(self.inner, name)

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


class SourceReader:
    """Lists one source, cuts it into units and reads the documents of any unit."""

    def __init__(self, source: DataSource, report: CurationReport, *,
                 unit_bytes: int = UNIT_BYTES, layout: SourceLayout | None = None):
        """`layout`: the source's files and footers as read once for every rank (default: read
        them here)."""
        self.source, self.report = source, report
        layout = read_layout(source) if layout is None else layout
        self.files = layout.files
        self._fs: fsspec.AbstractFileSystem | None = None
        self._fs_pid = -1
        self.units = cut_units(source.format, self.files, layout.row_groups, unit_bytes)
        self._bytes = [0]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """This process's filesystem. The producer's DataLoader worker is forked from the trainer,
        and fsspec's async filesystems (s3fs, gcsfs) refuse to run in a child with their parent's
        object ("This class is not fork-safe"); fsspec empties its instance cache in a new
        process, so opening the source again there gives the child one of its own."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, _ = open_fs(self.source.uri)
            self._fs_pid = os.getpid()
        return self._fs

    @property
    def hash(self) -> str:
        return content_hash(self.source, self.files)

    @property
    def bytes_read(self) -> int:
        return self._bytes[0]

    def documents(self, unit: Unit | None = None) -> Iterator[Document]:
        """The documents of one unit in file order, or of the whole source."""
        if unit is None:
            return (d for u in self.units for d in self.documents(u))
        read = {SourceFormat.text: self._text_unit, SourceFormat.jsonl: self._jsonl_unit,
                SourceFormat.parquet: self._parquet_unit}[self.source.format]
        return read(unit, self.files[unit.file])

    def _open(self, file: SourceFile) -> CountingFile:
        return CountingFile(self.fs.open(file.path, "rb"), self._bytes)

    def _origin(self, file: SourceFile, line: int, byte: int = -1) -> Origin:
        return Origin(self.source.name, file.path, line, byte)

    def _text_unit(self, unit: Unit, file: SourceFile) -> Iterator[Document]:
        with self._open(file) as f:
            data = f.read()
        text = self._decode_whole(file, data)
        if text is not None:
            yield Document(text, self._origin(file, 1))

    def _decode_whole(self, file: SourceFile, data: bytes) -> str | None:
        """The file as UTF-8 text, or None after reporting why it cannot be one."""
        problem = _binary_or_empty(data)
        if problem:
            self.report.bad_input(self._origin(file, problem[0]), problem[1])
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            self.report.bad_input(self._origin(file, line), _encoding_reason(data, exc))
            return None

    def _jsonl_unit(self, unit: Unit, file: SourceFile) -> Iterator[Document]:
        if file.size == 0:
            self.report.bad_input(self._origin(file, 0), "empty file")
            return
        with self._open(file) as f:
            pos = _first_owned_line(f, unit.start)
            line_no = 1 if unit.start == 0 else 0  # 0: located by byte offset only
            while pos < unit.end and (raw := f.readline()):
                origin = self._origin(file, line_no, pos)
                pos, line_no = pos + len(raw), line_no + 1 if line_no else 0
                doc = self._jsonl_record(origin, raw) if raw.strip() else None
                if doc is not None:
                    yield doc

    def _jsonl_record(self, origin: Origin, raw: bytes) -> Document | None:
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            self.report.bad_input(origin, _encoding_reason(raw, exc))
            return None
        except json.JSONDecodeError as exc:
            self.report.bad_input(origin, f"malformed JSON: {exc.msg} at column {exc.colno}")
            return None
        if not isinstance(record, dict):
            self.report.bad_input(origin, f"a JSON {type(record).__name__}, not an object")
            return None
        return self._record_document(record, origin)

    def _record_document(self, record: dict[str, Any], origin: Origin) -> Document | None:
        prompt, response = record.get("prompt"), record.get("response")
        if (self.source.role == SourceRole.instruction and isinstance(prompt, str)
                and isinstance(response, str)):
            return Document(response, origin, prompt=prompt)
        text = record.get(self.source.field)
        if not isinstance(text, str):
            found = "missing" if text is None else f"a {type(text).__name__}"
            self.report.bad_input(origin, f"field {self.source.field!r} is {found}, not a string")
            return None
        return Document(text, origin)

    def _parquet_unit(self, unit: Unit, file: SourceFile) -> Iterator[Document]:
        first, rows = self._row_group(unit, file)
        for row_no, row in enumerate(rows, start=first + 1):
            doc = self._record_document(row, self._origin(file, row_no))
            if doc is not None:
                yield doc

    def _row_group(self, unit: Unit, file: SourceFile) -> tuple[int, list[dict[str, Any]]]:
        """(rows before this group, so row numbers stay file-wide; the group's rows)."""
        import pyarrow.parquet as pq

        def read() -> tuple[int, list[dict[str, Any]]] | str:
            with self._open(file) as f:
                parquet = pq.ParquetFile(f)
                columns = set(parquet.schema_arrow.names)
                if self.source.field not in columns and not {"prompt", "response"} <= columns:
                    return f"no column {self.source.field!r} (has {sorted(columns)})"
                wanted = [c for c in (self.source.field, "prompt", "response") if c in columns]
                first = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
                return first, parquet.read_row_group(unit.start, columns=wanted).to_pylist()

        try:
            got = with_retries(f"{file.path} (Parquet row group {unit.start})", read)
        except SourceReadError:
            raise
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            got = f"not a readable Parquet file: {exc}"
        if isinstance(got, str):
            self.report.bad_input(self._origin(file, 0), got)
            return 0, []
        return got


def _first_owned_line(f: CountingFile, start: int) -> int:
    """Seek to the first line that starts at or after `start`; returns its offset. The line
    in progress at `start` belongs to the previous range (checking byte start-1 tells whether
    one is in progress)."""
    if start == 0:
        f.seek(0)
        return 0
    f.seek(start - 1)
    return start - 1 + len(f.readline())


def _binary_or_empty(data: bytes) -> tuple[int, str] | None:
    """(line, reason) when the bytes cannot be a text document at all."""
    if not data.strip():
        return 0, "empty file" if not data else "file holds only whitespace"
    nul = data.find(b"\x00")
    if nul >= 0:
        return data.count(b"\n", 0, nul) + 1, f"binary content (NUL byte at offset {nul})"
    return None


def _encoding_reason(data: bytes, exc: UnicodeDecodeError) -> str:
    bad = data[exc.start:exc.start + 1].hex()
    return f"not valid UTF-8 (byte 0x{bad} at offset {exc.start}; latin-1 or another encoding?)"
