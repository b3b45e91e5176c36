"""The pre-tokenised cache: a hit skips tokenisation entirely and yields the same batches; a
changed source or tokenizer misses it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpt_trainer.data import DataPipeline, tokenizer_hash
from cpt_trainer.data import tokenization

from .conftest import make_config


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """Counts the texts that reach the tokenizer (every path to it goes through encode_texts)."""
    calls: list[int] = []
    real = tokenization.encode_texts

    def counting(tokenizer, texts):
        calls.append(len(texts))
        return real(tokenizer, texts)

    monkeypatch.setattr(tokenization, "encode_texts", counting)
    return calls


@pytest.fixture
def cached_sources(corpora: dict[str, Path], tmp_path: Path) -> list[dict]:
    replay = tmp_path / "replay.jsonl"
    replay.write_bytes((corpora["replay"] / "stdlib.jsonl").read_bytes())
    return [{"name": "licenses", "role": "domain", "uri": str(corpora["domain"] / "*.txt"),
             "weight": 0.8, "cache": True},
            {"name": "stdlib", "role": "replay", "uri": str(replay), "format": "jsonl",
             "weight": 0.2, "cache": True}]


def _batches(pipe: DataPipeline, n: int = 6) -> list[torch.Tensor]:
    return [pipe.next_batch(4).input_ids for _ in range(n)]


def test_second_construction_reads_the_cache_and_not_the_tokenizer(tmp_path, tokenizer, encoded,
                                                                   cached_sources):
    cfg = make_config(tmp_path, cached_sources, seq_len=64)
    first = DataPipeline(cfg, tokenizer, 0, 1, report_dir=str(tmp_path / "r1"))
    assert sum(encoded) > 0
    done = sorted((tmp_path / "token-cache").glob("*/*/part-00000-of-00001/DONE"))
    assert len(done) == 2  # one part per source, beside the run directory
    assert json.loads(done[0].read_text())["tokenizer"] == tokenizer_hash(tokenizer)
    encoded.clear()
    second = DataPipeline(cfg, tokenizer, 0, 1, report_dir=str(tmp_path / "r2"))
    assert encoded == []
    assert second.data_version == first.data_version
    for a, b in zip(_batches(first), _batches(second)):
        assert torch.equal(a, b)
    # A cache hit still reports what curation did when the cache was written.
    assert (tmp_path / "r2" / "curation.json").read_text() == \
        (tmp_path / "r1" / "curation.json").read_text()


def test_cached_and_uncached_pipelines_give_the_same_batches(tmp_path, tokenizer,
                                                             cached_sources):
    cached = DataPipeline(make_config(tmp_path, cached_sources, seq_len=64), tokenizer, 0, 1)
    plain = [dict(s, cache=False) for s in cached_sources]
    uncached = DataPipeline(make_config(tmp_path, plain, seq_len=64), tokenizer, 0, 1)
    for a, b in zip(_batches(cached), _batches(uncached)):
        assert torch.equal(a, b)


def test_another_tokenizer_misses_the_cache(tmp_path, tokenizer, tiny_model_dir, encoded,
                                            cached_sources):
    from transformers import AutoTokenizer

    cfg = make_config(tmp_path, cached_sources, seq_len=64)
    DataPipeline(cfg, tokenizer, 0, 1)
    extended = AutoTokenizer.from_pretrained(tiny_model_dir)
    extended.add_tokens(["copyleft"])  # what tokenizer extension does
    assert tokenizer_hash(extended) != tokenizer_hash(tokenizer)
    encoded.clear()
    pipe = DataPipeline(cfg, extended, 0, 1)
    assert sum(encoded) > 0
    # The GPL calls itself a copyleft license: the new id is in the re-tokenised store, so
    # nothing stale was read.
    store = pipe._streams[pipe.source_names.index("licenses")].store
    assert (store.ids == extended.convert_tokens_to_ids("copyleft")).any()


def test_a_changed_source_misses_the_cache(tmp_path, tokenizer, encoded, cached_sources):
    cfg = make_config(tmp_path, cached_sources, seq_len=64)
    DataPipeline(cfg, tokenizer, 0, 1)
    replay = Path(cached_sources[1]["uri"])
    replay.write_text(replay.read_text().replace("import", "IMPORT"))
    encoded.clear()
    DataPipeline(cfg, tokenizer, 0, 1)
    # Only the changed source is tokenised again; the other one still hits.
    assert encoded and sum(encoded) == len(replay.read_text().splitlines())


def test_an_unfinished_cache_part_is_ignored(tmp_path, tokenizer, encoded, cached_sources):
    cfg = make_config(tmp_path, cached_sources, seq_len=64)
    reference = _batches(DataPipeline(cfg, tokenizer, 0, 1))
    for done in (tmp_path / "token-cache").glob("*/*/*/DONE"):
        done.unlink()  # as if the writer died before its commit point
    for ids in (tmp_path / "token-cache").glob("*/*/*/ids.npy"):
        ids.write_bytes(b"garbage")
    encoded.clear()
    pipe = DataPipeline(cfg, tokenizer, 0, 1)
    assert sum(encoded) > 0
    for a, b in zip(reference, _batches(pipe)):
        assert torch.equal(a, b)
