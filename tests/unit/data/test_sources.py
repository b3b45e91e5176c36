"""Sources: formats, globs, rank shards and the content hash that becomes the data version."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_operator.api.spec import DataSource
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


def _read(uri: str, fmt: str, rank: int = 0, world: int = 1) -> list[str]:
    source = DataSource(name="s", role="domain", uri=uri, format=fmt, field="body")
    return [d.text for d in SourceReader(source, rank, world, CurationReport()).documents()]


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_every_format_yields_the_same_documents(tmp_path, fmt):
    uri = _write(tmp_path / fmt, fmt, TEXTS)
    assert sorted(_read(uri, fmt)) == sorted(TEXTS)


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_shards_are_disjoint_and_cover_every_document(tmp_path, fmt, world):
    uri = _write(tmp_path / fmt, fmt, TEXTS)
    shards = [_read(uri, fmt, rank, world) for rank in range(world)]
    flat = [t for shard in shards for t in shard]
    assert len(flat) == len(set(flat)) == len(TEXTS) and set(flat) == set(TEXTS)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # round-robin over records, not over files


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


def test_any_fsspec_url_is_a_source():
    fs = fsspec.filesystem("memory")
    for i, text in enumerate(TEXTS[:4]):
        fs.pipe(f"/corpus-{id(fs)}/{i}.jsonl", (json.dumps({"body": text}) + "\n").encode())
    assert _read(f"memory:///corpus-{id(fs)}/*.jsonl", "jsonl") == TEXTS[:4]


def test_instruction_parquet_keeps_the_prompt_apart(tmp_path):
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt": ["Q: one?\nA:", "Q: two?\nA:"],
                             "response": [" one.", " two."]}), path)
    source = DataSource(name="sft", role="instruction", uri=str(path), format="parquet")
    docs = SourceReader(source, 0, 1, CurationReport()).documents()
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
