"""Resume on another world size: every document trained on exactly once per epoch, and the
worker gives the same batches as the in-process producer."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from cpt_trainer.data import DataPipeline
from cpt_trainer.data.stream import SourceStream

from .conftest import make_config

WORDS = [f"w{i}" for i in range(400)]


@pytest.fixture
def records(tmp_path):
    """One JSONL source of 60 distinct records of varied length (some span windows)."""
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 5 + (i * 7) % 40])}) + "\n"
                            for i in range(60)))
    return make_config(tmp_path, [{"name": "r", "role": "domain", "uri": str(path),
                                   "format": "jsonl"}], seq_len=24)


@pytest.fixture
def pieces(monkeypatch):
    """Every piece any stream hands out: (position, document in unit, start, end, length)."""
    seen: list[tuple[int, int, int, int, int]] = []
    real = SourceStream.take

    def take(self, limit):
        piece = real(self, limit)
        seen.append(self.last_piece)
        return piece

    monkeypatch.setattr(SourceStream, "take", take)
    return seen


def _head(pipe: DataPipeline) -> int:
    stream = pipe._core.streams[0]
    return stream.queue[0][0] if stream.queue else stream.next


def _pipes(cfg, tokenizer, world, workers=0):
    return [DataPipeline(cfg, tokenizer, r, world, workers=workers, unit_bytes=200)
            for r in range(world)]


def _check_epochs(pieces, units, docs_in_unit):
    """Epoch 0 complete, each document's tokens exactly once; later epochs never repeat."""
    chains = defaultdict(list)
    for q, doc, start, end, length in pieces:
        chains[q, doc].append((start, end, length))
    for (q, doc), parts in chains.items():
        parts.sort()
        starts = [p[0] for p in parts]
        assert starts == [0] + [p[1] for p in parts[:-1]], (q, doc, parts)  # no gap, no overlap
        if q < units:
            assert parts[-1][1] == parts[-1][2], (q, doc, parts)  # finished in epoch 0
    for q in range(units):
        assert sorted(d for p, d in chains if p == q) == list(range(docs_in_unit(q))), q


@pytest.mark.parametrize("old,new", [(4, 2), (2, 3), (2, 2)],
                         ids=["four ranks resume on two", "two ranks resume on three",
                              "two ranks resume on two"])
def test_every_document_is_trained_once_per_epoch_across_a_change_of_world_size(
        records, tokenizer, pieces, old, new):
    before = _pipes(records, tokenizer, old)
    for _ in range(3):
        for pipe in before:
            pipe.next_batch(2)
    states = [json.loads(json.dumps(p.state_dict())) for p in before]
    after = _pipes(records, tokenizer, new)
    for pipe in after:
        pipe.load_state_dicts(states)
    stream = after[0]._core.streams[0]
    units = stream.unit_count
    assert units >= 2 * max(old, new)  # the source really is cut into many units
    for _ in range(500):
        behind = [p for p in after if _head(p) < units]
        if not behind:
            break
        for pipe in behind:
            pipe.next_batch(1)
    assert not behind

    def docs_in_unit(q):
        return len(list(stream.reader.documents(stream.reader.units[stream.unit_index(q)])))

    _check_epochs(pieces, units, docs_in_unit)
    # The mixture's own state survives: run tokens are the old ranks' sum.
    tokens = sum(sum(s["tokens"].values()) for s in states)
    if old != new:
        assert after[0].state_dict()["base"] == {"r": tokens}


def test_loading_all_states_on_the_same_world_size_is_loading_ones_own(records, tokenizer):
    before = _pipes(records, tokenizer, 2)
    for pipe in before:
        pipe.next_batch(3)
    states = [json.loads(json.dumps(p.state_dict())) for p in before]
    for rank, pipe in enumerate(_pipes(records, tokenizer, 2)):
        pipe.load_state_dicts(states)
        assert pipe.state_dict() == states[rank]
        assert torch.equal(pipe.next_batch(2).input_ids, before[rank].next_batch(2).input_ids)


def test_states_of_other_data_are_refused_naming_both_versions(records, tokenizer, tmp_path):
    states = [p.state_dict() for p in _pipes(records, tokenizer, 2)]
    other = make_config(tmp_path, [dict(s.model_dump(by_alias=True)) for s in
                                   records.spec.data.sources], seq_len=24, seed=5)
    pipe = DataPipeline(other, tokenizer, 0, 3, workers=0, unit_bytes=200)
    with pytest.raises(ValueError, match=f"{states[0]['data_version']} != {pipe.data_version}"):
        pipe.load_state_dicts(states)


@pytest.mark.parametrize("strategy", ["fixed", "adaptive"])
def test_the_worker_gives_the_same_batches_and_states_as_the_training_process(
        tmp_path, tokenizer, two_sources, strategy):
    cfg = make_config(tmp_path, two_sources, seq_len=32, strategy=strategy)
    inline, worker = (DataPipeline(cfg, tokenizer, 0, 1, workers=w) for w in (0, 1))
    for step in range(40):
        a, b = inline.next_batch(4), worker.next_batch(4)
        for name in ("input_ids", "labels", "position_ids", "source_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
        assert inline.state_dict() == worker.state_dict(), step
        losses = {"licenses": 3.0 - step / 20, "stdlib": 3.0}
        inline.report_losses(losses)
        worker.report_losses(losses)
    assert inline.current_weights() == worker.current_weights()
    if strategy == "adaptive":  # the reports did steer the mixture
        assert inline.current_weights()["stdlib"] > 0.2
