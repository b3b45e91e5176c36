"""Tokenizer surgery on the tiny model: exact mean rows, tied heads, unchanged old behaviour."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_api.spec import RestoreMode, TokenizerExtensionSpec
from cpt_trainer.data import Batch
from cpt_trainer.data.tokenizer_hash import tokenizer_hash
from cpt_trainer.errors import Refused
from cpt_trainer.fragmentation import analyze
from cpt_trainer.extension import (Extension, NewTokenData, extend_tokenizer, mean_init,
                                   running_form, select_terms)

TERMS = ["sublicensable", "indemnification"]
PLAIN = "This program is free software; you can redistribute it under the terms of the licence."


@pytest.fixture()
def base(tiny_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture()
def extended(base, tmp_path):
    tok, _ = base
    return extend_tokenizer(tok, TERMS, str(tmp_path / "tok"))


def untie(model):
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() + 0.01)
    model.config.tie_word_embeddings = False
    return model


def test_a_term_becomes_one_token_only_as_a_word_in_running_text(base, extended):
    tok, _ = base
    new_tok, tokens = extended
    assert [t.token for t in tokens] == [running_form(tok, t) for t in TERMS]
    assert all(t.token.startswith("Ġ") and len(t.pieces) > 1 for t in tokens)
    ids = new_tok("a sublicensable licence", add_special_tokens=False)["input_ids"]
    assert ids[1] == tokens[0].id and new_tok.decode(ids) == "a sublicensable licence"
    for text in ("a sublicensablex", "(sublicensable)", "sublicensable at the start"):
        assert new_tok(text)["input_ids"] == tok(text)["input_ids"], text


def test_text_without_new_terms_keeps_its_ids(base, extended, corpora):
    tok, _ = base
    new_tok, _ = extended
    texts = [p.read_text() for p in sorted(corpora["domain"].glob("*.txt"))[:5]]
    for text in texts:
        if not any(term in text for term in TERMS):
            assert new_tok(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "untied head"])
def test_new_rows_are_the_mean_of_the_old_piece_rows(base, extended, tied):
    _, model = base
    if not tied:
        untie(model)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    _, tokens = extended
    mean_init(model, tokens)
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape[0] == max(t.id for t in tokens) + 1 == model.config.vocab_size
    for t in tokens:
        assert torch.equal(new_in[t.id], old_in[list(t.pieces)].mean(0))
        assert torch.equal(new_out[t.id], old_out[list(t.pieces)].mean(0))
    assert torch.equal(new_in[:old_in.shape[0]], old_in)
    if tied:
        assert new_out.data_ptr() == new_in.data_ptr()
    else:
        assert new_out.data_ptr() != new_in.data_ptr()


def test_logits_on_old_text_are_unchanged_right_after_surgery(base, extended):
    tok, model = base
    ids = torch.tensor([tok(PLAIN, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        mean_init(model, extended[1])
        after = model(input_ids=ids).logits
    assert after.shape[-1] == before.shape[-1] + len(TERMS)
    assert torch.equal(after[..., :before.shape[-1]], before)


def test_fit_applies_once_and_records_the_extension_in_the_config(base, extended, tmp_path):
    tok, model = base
    new_tok, tokens = extended
    ext = Extension(TokenizerExtensionSpec(terms=TERMS), tokenizer_hash(tok), new_tok, tokens)
    ext.fit(model)
    rows = model.get_input_embeddings().weight.detach().clone()
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ext.fit(again)
    assert torch.equal(again.get_input_embeddings().weight, rows)
    assert ext.accepts(ext.hash, RestoreMode.full_state)
    assert ext.accepts(ext.base_hash, RestoreMode.weights_only)
    with pytest.raises(Refused, match="weightsOnly"):
        ext.accepts(ext.base_hash, RestoreMode.full_state)
    assert not ext.accepts("0" * 64, RestoreMode.weights_only)


def test_extension_is_deterministic_and_survives_a_save(base, tmp_path):
    tok, _ = base
    a, _ = extend_tokenizer(tok, TERMS, str(tmp_path / "a"))
    b, _ = extend_tokenizer(tok, TERMS, str(tmp_path / "b"))
    assert tokenizer_hash(a) == tokenizer_hash(b) != tokenizer_hash(tok)
    a.save_pretrained(tmp_path / "saved")
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "saved")) == tokenizer_hash(a)


def test_top_k_selection_is_deterministic_and_ranked_by_saving(base, corpora):
    tok, _ = base
    domain = [p.read_text() for p in sorted(corpora["domain"].glob("*.txt"))]
    spec = TokenizerExtensionSpec(terms=["sublicensable"], top_k=5)
    first = select_terms(spec, tok, domain)
    assert first == select_terms(spec, tok, list(domain))
    assert first[0] == "sublicensable" and len(first) == 6 and len(set(first)) == 6
    vocab = tok.get_vocab()
    assert all(running_form(tok, t) not in vocab for t in first)
    saving = {c.term: c.saving for c in analyze(tok, domain, top=100).candidates}
    picked = [saving[t] for t in first[1:]]
    assert picked == sorted(picked, reverse=True) and picked[-1] > 0


def test_a_term_that_is_several_words_is_refused(base):
    tok, _ = base
    with pytest.raises(Refused, match="pre-tokens"):
        select_terms(TokenizerExtensionSpec(terms=["max-len"]), tok)


class Windows:
    """A stand-in pipeline: window i holds token i % 7, so new-token windows are known."""

    def __init__(self) -> None:
        self.i = 0

    def next_batch(self, batch_size: int) -> Batch:
        ids = torch.tensor([[self.i % 7] * 4 for _ in range(batch_size)]) + 1
        self.i += batch_size
        return Batch(ids, ids, torch.arange(4).expand_as(ids), torch.zeros_like(ids),
                     3 * batch_size)

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        self.i = state["i"]


def test_oversampling_keeps_new_token_windows_and_resumes_exactly(base, extended):
    tok, _ = base
    new_tok, tokens = extended
    ext = Extension(TokenizerExtensionSpec(terms=TERMS), tokenizer_hash(tok), new_tok, tokens)
    ext.ids = torch.tensor([1])  # windows of token 1 count as "new"
    data = NewTokenData(Windows(), ext, factor=4.0, batches=50, seed=3, rank=0)
    first = [data.next_batch(2) for _ in range(25)]
    state = data.state_dict()
    rest = [data.next_batch(2) for _ in range(25)]
    share = sum(int((b.input_ids[:, 0] == 1).sum()) for b in first + rest) / 100
    assert share > 2 * (1 / 7)  # 1 in 7 windows without oversampling, 4 in 10 with factor 4
    resumed = NewTokenData(Windows(), ext, factor=4.0, batches=50, seed=3, rank=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(2).input_ids, b.input_ids) for b in rest)
    before = data.pipeline.i
    data.next_batch(2)  # the warm-up is over: plain draws, nothing rejected
    assert data.pipeline.i == before + 2


def test_new_token_counters_sum_loss_and_targets(base, extended):
    tok, _ = base
    new_tok, tokens = extended
    ext = Extension(TokenizerExtensionSpec(terms=TERMS), tokenizer_hash(tok), new_tok, tokens)
    data = NewTokenData(Windows(), ext, factor=1.0, batches=0, seed=0, rank=0)
    a, b = tokens[0].id, tokens[1].id
    ids = torch.tensor([[5, a, 7, a, b]])
    labels = ids.clone()
    labels[0, 0] = -100
    nll = torch.tensor([[1.0, 2.0, 3.0, 5.0]])  # the losses of predicting ids[1:]
    data.observe(Batch(ids, labels, torch.arange(5)[None], torch.zeros_like(ids), 4), nll)

    class Sink:
        calls: list = []

        def new_token(self, token, *, loss, seen):
            self.calls.append((token, loss, seen))

    sink = Sink()
    data.end_step(sink)
    assert sorted(sink.calls) == sorted([(TERMS[0], 2.0, 2), (TERMS[1], 5.0, 1)])
    metrics = data.checkpoint_metrics()
    assert metrics[f"new_token.{TERMS[0]}.loss"] == 2.0 and metrics["new_tokens.seen"] == 3
    assert metrics["new_tokens.loss"] == pytest.approx(9 / 3) and metrics["new_tokens.unseen"] == 0
    assert "new_tokens.loss" not in data.checkpoint_metrics()  # a new interval has begun


def test_new_token_series_are_exported_with_the_run_labels(tiny_model_dir, corpora, tmp_path):
    from cpt_api.trainer_config import TrainerConfig
    from cpt_trainer.metrics import Metrics
    from tests.integration.harness import tiny_spec

    cfg = TrainerConfig.model_validate({"run": "r", "spec": tiny_spec(tiny_model_dir, corpora),
                                        "runDir": str(tmp_path), "checkpointUri": str(tmp_path)})
    metrics = Metrics(cfg, serve=False)
    metrics.new_token("sublicensable", loss=2.5, seen=3)
    metrics.new_token("sublicensable", loss=2.0, seen=2)
    labels = {"run": "r", "namespace": "local", "attempt": "1", "token": "sublicensable"}
    assert metrics.registry.get_sample_value("cpt_new_token_loss", labels) == 2.0
    assert metrics.registry.get_sample_value("cpt_new_token_seen_total", labels) == 5
