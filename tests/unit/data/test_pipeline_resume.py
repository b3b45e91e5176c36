"""The pipeline's interface and exact resumption (single rank and two ranks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpt_trainer.data import Batch, DataPipeline

from .conftest import make_config


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("input_ids", "labels", "position_ids", "source_ids"))


def test_batches_have_the_documented_shape(tmp_path, tokenizer, two_sources):
    pipe = DataPipeline(make_config(tmp_path, two_sources, seq_len=48), tokenizer, 0, 1)
    batch = pipe.next_batch(3)
    for name in ("input_ids", "labels", "position_ids", "source_ids"):
        tensor = getattr(batch, name)
        assert tensor.shape == (3, 48) and tensor.dtype == torch.long, name
    assert batch.num_tokens == int((batch.labels != -100).sum())
    assert pipe.source_names == ["licenses", "stdlib"] and pipe.roles == ["domain", "replay"]
    assert pipe.tokens_seen == 3 * 48
    assert len(pipe.data_version) == 64


@pytest.mark.parametrize("world_size", [1, 2], ids=["one rank", "two ranks"])
def test_resume_from_a_json_state_continues_the_exact_batch_sequence(
        tmp_path, tokenizer, two_sources, world_size):
    cfg = make_config(tmp_path, two_sources, seq_len=96)
    for rank in range(world_size):
        uninterrupted = DataPipeline(cfg, tokenizer, rank, world_size)
        interrupted = DataPipeline(cfg, tokenizer, rank, world_size)
        for _ in range(7):
            uninterrupted.next_batch(4)
            interrupted.next_batch(4)
        state = json.loads(json.dumps(interrupted.state_dict()))
        resumed = DataPipeline(cfg, tokenizer, rank, world_size)
        resumed.load_state_dict(state)
        for _ in range(12):  # long enough to pass split documents and the end of an epoch
            assert _same(uninterrupted.next_batch(4), resumed.next_batch(4))
        assert resumed.realised_proportions() == uninterrupted.realised_proportions()


def test_sources_are_re_read_when_exhausted(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("one small document that is read again and again\n")
    cfg = make_config(tmp_path, [{"name": "a", "role": "domain", "uri": str(tmp_path / "a.txt")}],
                      seq_len=32)
    pipe = DataPipeline(cfg, tokenizer, 0, 1)
    for _ in range(5):
        pipe.next_batch(2)
    # One unit on one rank: position q is epoch q; more than two epochs have been begun.
    assert pipe.state_dict()["streams"]["a"]["next"] > 2


def test_loading_a_state_of_other_data_is_refused(tmp_path, tokenizer, two_sources):
    pipe = DataPipeline(make_config(tmp_path, two_sources), tokenizer, 0, 1)
    state = pipe.state_dict()
    other = DataPipeline(make_config(tmp_path, two_sources, seed=1), tokenizer, 0, 1)
    with pytest.raises(ValueError, match="data version"):
        other.load_state_dict(state)
    two_rank = DataPipeline(make_config(tmp_path, two_sources), tokenizer, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        two_rank.load_state_dict(state)


def test_ranks_read_disjoint_units(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"document number {i} " * 5)
    cfg = make_config(tmp_path, [{"name": "d", "role": "domain", "uri": str(docs / "*.txt")}],
                      seq_len=16)
    seen = []
    for rank in range(2):
        stream = DataPipeline(cfg, tokenizer, rank, 2, workers=0)._core.streams[0]
        # Positions r, r + 2, r + 4 of epoch 0: the units (files) this rank reads first.
        units = [stream.reader.units[stream.unit_index(q)] for q in range(rank, 6, 2)]
        seen.append({Path(stream.reader.files[u.file].path).name for u in units})
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {f"{i}.txt" for i in range(6)}


def test_a_skip_window_drops_exactly_those_windows_of_its_source(tmp_path, tokenizer, two_sources):
    """Restored from the same state, the pipeline packs and drops the skipped source's windows
    inside [start, end) of its consumed tokens: the windows after them, and the other source's,
    are the ones an unskipped stream gives."""
    from cpt_api.skips import DataSkip

    plain = DataPipeline(make_config(tmp_path, two_sources, seq_len=48), tokenizer, 0, 1,
                         workers=0)
    seen = []
    for _ in range(40):
        before = plain.consumed_tokens()["licenses"]
        window = plain.next_batch(1)
        seen.append((int(window.source_ids[0, 0]), before, window.input_ids[0]))
    cfg = make_config(tmp_path, two_sources, seq_len=48)
    cfg.overrides.skips = [DataSkip(source="licenses", start=48 * 5, end=48 * 9)]
    skipping = DataPipeline(cfg, tokenizer, 0, 1)
    kept = [s for s in seen if not (s[0] == 0 and 48 * 5 <= s[1] < 48 * 9)]
    got = [skipping.next_batch(1) for _ in range(len(kept) - 4)]
    licenses = [(ids, w.input_ids[0]) for (src, _, ids), w in zip(kept, got) if src == 0]
    assert all(torch.equal(a, b) for a, b in licenses) and len(licenses) > 10
    assert skipping.state_dict()["skipped"]["licenses"] == 48 * 4
