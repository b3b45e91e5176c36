"""Packing: document boundaries reach the model, and the loss mask never crosses them.

The contamination tests run the tiny real Llama on packed windows from a real DataPipeline and
compare the logits of one document when the document packed before it is swapped for another.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpt_trainer.data import Batch, DataPipeline
from cpt_trainer.data.packing import IGNORE, check_document_isolation

from .conftest import make_config

LICENSE = Path("/usr/share/common-licenses/GPL-3")


def _paragraphs(count: int = 60, words: int = 30) -> list[str]:
    tokens = LICENSE.read_text().split()
    return [" ".join(tokens[i:i + words]) for i in range(0, count * words, words)]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _segments(batch: Batch, eos: int, row: int = 0) -> list[tuple[int, int]]:
    """(start, end) of each document of a window, cut after every EOS."""
    ids = batch.input_ids[row].tolist()
    cuts = [0] + [i + 1 for i, t in enumerate(ids) if t == eos]
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [len(ids)]) if a < b]


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return {impl: AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl)
            .eval() for impl in ("sdpa", "eager")}


class _Pair:
    """A two-record JSONL source packed into one window: [first, eos, second, eos, ...]."""

    def __init__(self, tmp_path: Path, tokenizer, texts: list[str], boundary: str):
        self.tmp_path, self.tokenizer, self.boundary = tmp_path, tokenizer, boundary
        self.eos = tokenizer.eos_token_id
        # Room for a longer replacement of the first document.
        self.seq_len = sum(len(_ids(tokenizer, t)) + 1 for t in texts) + 64
        self.texts = texts
        self.batch = self._pack(texts, "a")
        first = self.batch.input_ids[0, :_segments(self.batch, self.eos)[0][1] - 1].tolist()
        # A unit's documents come in file order, never by content, so swapping the text of
        # the record that came first keeps it first.
        self.first = next(i for i, t in enumerate(texts) if _ids(tokenizer, t) == first)

    def _pack(self, texts: list[str], tag: str) -> Batch:
        path = self.tmp_path / tag / "pair.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cfg = make_config(path.parent, [{"name": "pair", "role": "domain", "uri": str(path),
                                         "format": "jsonl"}],
                          seq_len=self.seq_len, boundary=self.boundary)
        return DataPipeline(cfg, self.tokenizer, 0, 1).next_batch(1)

    def with_first_replaced(self, text: str) -> Batch:
        texts = list(self.texts)
        texts[self.first] = text
        return self._pack(texts, f"swap{len(list(self.tmp_path.iterdir()))}")

    def second_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, list]:
        start, end = _segments(batch, self.eos)[1]
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits[0, start:end]
        return logits, batch.input_ids[0, start:end].tolist()


def _replacement(tokenizer, original: str, same_length: bool) -> str:
    """Another paragraph, with the same token count as `original` or a clearly different one."""
    n = len(_ids(tokenizer, original))
    for text in _paragraphs(200, 30)[10:]:
        m = len(_ids(tokenizer, text))
        if (m == n) if same_length else 5 < abs(m - n) < 50:
            return text
    raise AssertionError("no suitable replacement paragraph in the license text")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("same_length", [True, False],
                         ids=["replacement of equal length", "replacement of other length"])
def test_document_mask_logits_ignore_the_previous_document(tmp_path, tokenizer, models, impl,
                                                           same_length):
    pair = _Pair(tmp_path, tokenizer, _paragraphs()[1::-1], "documentMask")
    swapped = pair.with_first_replaced(
        _replacement(tokenizer, pair.texts[pair.first], same_length))
    before, doc = pair.second_logits(models[impl], pair.batch)
    after, doc_again = pair.second_logits(models[impl], swapped)
    assert doc == doc_again  # the same document, now behind another one
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it reads exactly as if it were alone in the window
        alone = models[impl](input_ids=torch.tensor([doc]), use_cache=False).logits[0]
    torch.testing.assert_close(before, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_eos_boundary_lets_the_previous_document_change_the_logits(tmp_path, tokenizer, models,
                                                                    impl):
    pair = _Pair(tmp_path, tokenizer, _paragraphs()[1::-1], "eos")
    swapped = pair.with_first_replaced(
        _replacement(tokenizer, pair.texts[pair.first], same_length=True))
    before, doc = pair.second_logits(models[impl], pair.batch)
    after, doc_again = pair.second_logits(models[impl], swapped)
    assert doc == doc_again
    # Same positions, same tokens: only attention across the EOS can move these logits.
    assert (after - before).abs().max() > 1e-2


def test_isolation_check_passes_with_the_batch_contract_and_catches_a_kv_cache(models,
                                                                               monkeypatch):
    for model in models.values():
        check_document_isolation(model)
        check_document_isolation(model, flatten=True)
    # The failure it exists for: a forward with the model's default use_cache=True creates a
    # KV cache, and transformers then skips the packed-sequence mask.
    monkeypatch.setattr(Batch, "model_inputs",
                        lambda self, flatten=False: {"input_ids": self.input_ids,
                                                     "position_ids": self.position_ids})
    with pytest.raises(RuntimeError, match="attend to each other"):
        check_document_isolation(models["sdpa"])


@pytest.mark.parametrize("boundary", ["eos", "documentMask"])
def test_no_label_predicts_a_document_start_from_the_previous_document(
        tmp_path, tokenizer, two_sources, boundary):
    short = tmp_path / "paragraphs.jsonl"
    short.write_text("".join(json.dumps({"text": t}) + "\n" for t in _paragraphs()))
    sources = [{"name": "paragraphs", "role": "domain", "uri": str(short), "format": "jsonl"},
               two_sources[1]]
    pipe = DataPipeline(make_config(tmp_path, sources, seq_len=128, boundary=boundary),
                        tokenizer, 0, 1)
    eos = tokenizer.eos_token_id
    starts_seen = 0
    for _ in range(5):
        batch = pipe.next_batch(4)
        ids, labels, pos = batch.input_ids, batch.labels, batch.position_ids
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = ids[:, :-1] == eos
        starts_seen += int(starts[:, 1:].sum())
        assert (labels[starts] == IGNORE).all()
        # Everything else is trained on (no instruction source here), the closing EOS included.
        assert torch.equal(labels[~starts], ids[~starts])
        assert batch.num_tokens == int((~starts).sum())
        if boundary == "documentMask":
            assert torch.equal(pos == 0, starts)
        else:
            assert torch.equal(pos, torch.arange(128).expand(4, -1))
    assert starts_seen > 10  # the windows really held several documents


def test_instruction_records_take_loss_on_response_tokens_only(tmp_path, tokenizer):
    prompt, response = "Question: what does clause 7 allow?\nAnswer:", " Additional terms."
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")
    p_ids, r_ids = _ids(tokenizer, prompt), _ids(tokenizer, response)
    doc = p_ids + r_ids + [tokenizer.eos_token_id]
    cfg = make_config(tmp_path, [
        {"name": "sft", "role": "instruction", "uri": str(path), "format": "jsonl"},
        {"name": "raw", "role": "domain", "uri": str(path), "format": "jsonl", "field": "prompt",
         "weight": 1e-9}], seq_len=len(doc) * 3)
    batch = DataPipeline(cfg, tokenizer, 0, 1).next_batch(1)
    assert batch.input_ids[0].tolist() == doc * 3
    expected = [IGNORE] * len(p_ids) + r_ids + [tokenizer.eos_token_id]
    assert batch.labels[0].tolist() == expected * 3
    assert batch.num_tokens == 3 * (len(r_ids) + 1)


def test_a_document_longer_than_the_window_continues_in_the_next_one(tmp_path, tokenizer):
    text = " ".join(_paragraphs(4))
    (tmp_path / "long.txt").write_text(text)
    doc = _ids(tokenizer, text) + [tokenizer.eos_token_id]
    cfg = make_config(tmp_path, [{"name": "long", "role": "domain",
                                  "uri": str(tmp_path / "long.txt")}], seq_len=32)
    pipe = DataPipeline(cfg, tokenizer, 0, 1)
    windows = [pipe.next_batch(1) for _ in range(len(doc) // 32 + 2)]
    flat = torch.cat([w.input_ids[0] for w in windows]).tolist()
    assert flat[:len(doc)] == doc and flat[len(doc):2 * len(doc)] == doc[:len(flat) - len(doc)]
    for w in windows:
        # A continuation is a fresh segment: position 0, and no loss on its first token,
        # whose context sits in the previous window.
        assert w.position_ids[0, 0] == 0 and w.labels[0, 0] == IGNORE


def test_model_inputs_are_what_the_forward_needs(tmp_path, tokenizer, two_sources, models):
    batch = DataPipeline(make_config(tmp_path, two_sources, seq_len=32), tokenizer, 0, 1) \
        .next_batch(2)
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"}
    assert inputs["use_cache"] is False and "attention_mask" not in inputs
    with torch.no_grad():
        out = models["sdpa"](**inputs, labels=batch.labels)
    assert out.logits.shape == (2, 32, models["sdpa"].config.vocab_size)
    assert torch.isfinite(out.loss)


def test_flattened_windows_give_the_same_logits_as_rows(tmp_path, tokenizer, two_sources, models):
    batch = DataPipeline(make_config(tmp_path, two_sources, seq_len=48), tokenizer, 0, 1) \
        .next_batch(3)
    flat = batch.model_inputs(flatten=True)
    assert flat["input_ids"].shape == flat["position_ids"].shape == (1, 3 * 48)
    with torch.no_grad():
        rows = models["sdpa"](**batch.model_inputs()).logits
        joined = models["sdpa"](**flat).logits.reshape(3, 48, -1)
    torch.testing.assert_close(joined, rows, atol=1e-5, rtol=1e-5)


def test_special_token_text_inside_a_document_is_not_a_boundary(tmp_path, tokenizer):
    text = 'The tokenizer splits on "<|endoftext|>" and the rest of this sentence.'
    (tmp_path / "doc.txt").write_text(text)
    cfg = make_config(tmp_path, [{"name": "doc", "role": "domain",
                                  "uri": str(tmp_path / "doc.txt")}], seq_len=128)
    batch = DataPipeline(cfg, tokenizer, 0, 1).next_batch(1)
    ids = batch.input_ids[0].tolist()
    eos = tokenizer.eos_token_id
    doc_len = ids.index(eos) + 1
    assert tokenizer.decode(ids[:doc_len - 1]) == text  # the literal survives as text
    assert ids[:doc_len] == ids[doc_len:2 * doc_len]  # the next copy starts right after the EOS
    assert tokenizer.encode(text, add_special_tokens=False).count(eos) == 1  # HF's default
