"""Sources: formats, globs, units and the content hash that becomes the data version."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_api.spec import DataSource
from cpt_trainer.data import DataPipeline
from cpt_trainer.data.report import CurationReport
from cpt_trainer.data.sources import SourceReader

from .conftest import make_config

WORDS = Path("/usr/share/common-licenses/GPL-3").read_text().split()
TEXTS = [" ".join(WORDS[i * 25:(i + 1) * 25]) for i in range(23)]


def _write(root: Path, fmt: str, texts: list[str], files: int = 3) -> str:
    """`texts` spread over `files` files of one format; returns the source URI (a glob)."""
    root.mkdir(parents=True, exist_ok=True)
    chunks = [texts[i::files] for i in range(files)] if fmt != "text" else [[t] for t in texts]
    for i, chunk in enumerate(chunks):
        path = root / f"part-{i:03d}.{fmt}"
        if fmt == "text":
            path.write_text(chunk[0])
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for t in chunk))
        else:
            pq.write_table(pa.table({"body": chunk, "n": [i] * len(chunk)}), path)
    return str(root / f"*.{fmt}")


def _reader(uri: str, fmt: str, unit_bytes: int = 1 << 20) -> SourceReader:
    source = DataSource(name="s", role="domain", uri=uri, format=fmt, field="body")
    return SourceReader(source, CurationReport(), unit_bytes=unit_bytes)


def _read(uri: str, fmt: str) -> list[str]:
    return [d.text for d in _reader(uri, fmt).documents()]


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_every_format_yields_the_same_documents(tmp_path, fmt):
    uri = _write(tmp_path / fmt, fmt, TEXTS)
    assert sorted(_read(uri, fmt)) == sorted(TEXTS)


@pytest.mark.parametrize("unit_bytes", [1, 50, 333, 1 << 20],
                         ids=["a byte", "shorter than a line", "a few lines", "whole files"])
def test_jsonl_ranges_own_the_lines_that_start_in_them(tmp_path, unit_bytes):
    uri = _write(tmp_path / "j", "jsonl", TEXTS)
    reader = _reader(uri, "jsonl", unit_bytes)
    per_unit = [[d.text for d in reader.documents(u)] for u in reader.units]
    assert [t for unit in per_unit for t in unit] == _read(uri, "jsonl")
    assert len(reader.units) >= sum(f.size for f in reader.files) // unit_bytes
    # A range reads its own bytes, plus at most the line in progress at each of its ends.
    longest = max(len(line) for f in reader.files for line in open(f.path.removeprefix("file://"), "rb"))
    total = sum(f.size for f in reader.files)
    assert reader.bytes_read <= total + 2 * len(reader.units) * longest


def test_parquet_units_are_row_groups(tmp_path):
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"body": TEXTS}), path, row_group_size=5)
    reader = _reader(str(path), "parquet")
    assert len(reader.units) == 5
    assert [d.text for u in reader.units for d in reader.documents(u)] == TEXTS
    assert [d.origin.line for d in reader.documents(reader.units[1])] == list(range(6, 11))


def test_globs_and_directories_select_files_in_sorted_order(tmp_path):
    root = tmp_path / "mixed"
    _write(root, "jsonl", TEXTS[:6], files=2)
    (root / "notes.txt").write_text("not part of the glob")
    nested = root / "deeper"
    _write(nested, "jsonl", TEXTS[6:9], files=1)
    assert _read(str(root / "*.jsonl"), "jsonl") == TEXTS[0:6:2] + TEXTS[1:6:2]
    assert _read(str(root / "**" / "*.jsonl"), "jsonl") == \
        TEXTS[6:9] + TEXTS[0:6:2] + TEXTS[1:6:2]
    # A directory means every file below it, in path order (deeper/ sorts first).
    assert _read(str(nested), "jsonl") == TEXTS[6:9]


def test_an_object_store_url_is_a_source(memory_object_store):
    fs = fsspec.filesystem(memory_object_store)
    for i, text in enumerate(TEXTS[:4]):
        fs.pipe(f"/corpus-{id(fs)}/{i}.jsonl", (json.dumps({"body": text}) + "\n").encode())
    assert _read(f"{memory_object_store}://corpus-{id(fs)}/*.jsonl", "jsonl") == TEXTS[:4]


def test_instruction_parquet_keeps_the_prompt_apart(tmp_path):
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt": ["Q: one?\nA:", "Q: two?\nA:"],
                             "response": [" one.", " two."]}), path)
    source = DataSource(name="sft", role="instruction", uri=str(path), format="parquet")
    docs = SourceReader(source, CurationReport()).documents()
    assert [(d.prompt, d.text) for d in docs] == [("Q: one?\nA:", " one."),
                                                 ("Q: two?\nA:", " two.")]


def test_content_hash_follows_the_bytes(tmp_path, tokenizer):
    uri = _write(tmp_path / "c", "jsonl", TEXTS)
    cfg = make_config(tmp_path, [{"name": "c", "role": "domain", "uri": uri, "format": "jsonl",
                                  "field": "body"}])

    def version() -> str:
        return DataPipeline(cfg, tokenizer, 0, 1).data_version

    first = version()
    assert version() == first  # stable while nothing changes
    target = tmp_path / "c" / "part-001.jsonl"
    original = target.read_bytes()
    # Same length, written at once: size and mtime could both be unchanged.
    target.write_bytes(original.replace(b"the", b"THE", 1))
    assert len(target.read_bytes()) == len(original)
    changed = version()
    assert changed != first
    target.write_bytes(original)
    assert version() == first
    (tmp_path / "c" / "part-999.jsonl").write_text(json.dumps({"body": "a new file"}) + "\n")
    assert version() not in (first, changed)
