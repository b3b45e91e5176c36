"""Reading sources through fsspec: listing, content hashes, documents, rank shards.

A source URI is a local path, any fsspec URL (`s3://bucket/prefix/`, `memory://...`) or a glob
of either. A directory means every file below it. The listing is sorted, so every rank sees the
same order and the same document numbering.

Documents and shards:
- `text`: one file is one document; document i is file i of the listing.
- `jsonl`: one line is one record; the text is `record[field]`. Blank lines are not records.
  Instruction sources may carry `prompt` and `response` fields instead: the prompt is kept apart
  so packing can mask it out of the loss. A record with only `field` is trainable throughout.
- `parquet`: one row is one record; the text is column `field` (or `prompt` / `response`).
Records are numbered across the sorted files; rank r of w owns record i when i % w == r. A text
source's rank opens only its own files; JSONL / Parquet ranks scan every file (to count records)
but decode only their own records, so a malformed line is reported once, by its owner.

Unreadable input (binary files, invalid UTF-8, empty files, malformed or field-less JSON lines,
null Parquet cells) is reported with file and line and skipped: one bad file does not stop a run.

S3: endpoint and credentials come from the standard AWS environment (see
`cpt_operator.api.storage`, shared with the operator).
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from cpt_operator.api.spec import DataSource, SourceFormat, SourceRole
from cpt_operator.api.storage import storage_options

from .report import CurationReport, Origin

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


class SourceReader:
    """Reads the documents of one source that belong to one rank."""

    def __init__(self, source: DataSource, rank: int, world_size: int, report: CurationReport):
        self.source, self.rank, self.world_size, self.report = source, rank, world_size, report
        self.fs, self.files = list_files(source.uri)
        self._next_record = 0

    @property
    def hash(self) -> str:
        return content_hash(self.source, self.files)

    def documents(self) -> list[Document]:
        self._next_record = 0
        read = {SourceFormat.text: self._text_file, SourceFormat.jsonl: self._jsonl_file,
                SourceFormat.parquet: self._parquet_file}[self.source.format]
        docs = [doc for i, f in enumerate(self.files) for doc in read(i, f)]
        self.report.read[self.source.name] = len(docs)
        return docs

    def _mine(self, index: int) -> bool:
        return index % self.world_size == self.rank

    def _origin(self, file: SourceFile, line: int) -> Origin:
        return Origin(self.source.name, file.path, line)

    def _read_bytes(self, file: SourceFile) -> bytes:
        with self.fs.open(file.path, "rb") as f:
            return bytes(f.read())

    def _text_file(self, index: int, file: SourceFile) -> Iterator[Document]:
        if not self._mine(index):
            return
        text = self._decode_whole(file, self._read_bytes(file))
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

    def _jsonl_file(self, index: int, file: SourceFile) -> Iterator[Document]:
        data = self._read_bytes(file)
        problem = _binary_or_empty(data)
        if problem:
            if self.rank == 0:  # a whole-file problem is reported once, not once per rank
                self.report.bad_input(self._origin(file, problem[0]), problem[1])
            return
        for line_no, raw in enumerate(io.BytesIO(data), start=1):
            if not raw.strip():
                continue
            record_index, self._next_record = self._next_record, self._next_record + 1
            if self._mine(record_index):
                doc = self._jsonl_record(file, line_no, raw)
                if doc is not None:
                    yield doc

    def _jsonl_record(self, file: SourceFile, line_no: int, raw: bytes) -> Document | None:
        origin = self._origin(file, line_no)
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

    def _parquet_file(self, index: int, file: SourceFile) -> Iterator[Document]:
        import pyarrow.parquet as pq

        try:
            with self.fs.open(file.path, "rb") as f:
                table = pq.read_table(f)
        except Exception as exc:  # pyarrow raises several types for a broken file
            if self.rank == 0:
                self.report.bad_input(self._origin(file, 0), f"not a readable Parquet file: {exc}")
            return
        columns = set(table.column_names)
        wanted = [c for c in (self.source.field, "prompt", "response") if c in columns]
        if self.source.field not in columns and not {"prompt", "response"} <= columns:
            if self.rank == 0:
                self.report.bad_input(self._origin(file, 0),
                                      f"no column {self.source.field!r} (has {sorted(columns)})")
            return
        rows = table.select(wanted).to_pylist()
        for row_no, row in enumerate(rows, start=1):
            record_index, self._next_record = self._next_record, self._next_record + 1
            if self._mine(record_index):
                doc = self._record_document(row, self._origin(file, row_no))
                if doc is not None:
                    yield doc


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
