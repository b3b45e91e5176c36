"""Perplexity / NLL suites against an independent computation with plain forward passes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpt_trainer.evals import Evaluator
from cpt_trainer.evals.perplexity import windows

from .conftest import evaluation, suite, write_jsonl

CPU = torch.device("cpu")


def license_snippets(corpora: dict[str, Path], n: int, chars: int) -> list[str]:
    files = sorted(corpora["domain"].glob("*.txt"))[:n]
    return [f.read_text()[:chars] for f in files]


def reference_nll(model: torch.nn.Module, tokenizer, texts: list[str],  # type: ignore[no-untyped-def]
                  lead: list[int] = []) -> tuple[float, int]:  # noqa: B006 (never mutated)
    """Summed NLL over every token after the first of `lead + text + eos`, one unpadded forward each."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = lead + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            x = torch.tensor([ids])
            logp = F.log_softmax(model(input_ids=x).logits.float()[0, :-1], dim=-1)
            total -= logp.gather(1, x[0, 1:, None]).sum().item()
            count += len(ids) - 1
    return total, count


def test_perplexity_is_exp_of_token_weighted_nll(tiny, corpora, tmp_path: Path) -> None:
    model, tokenizer = tiny
    # Short, unequal texts: every one fits a window, so the reference needs no windowing at all,
    # and the unequal lengths make a per-text (unweighted) mean come out differently.
    texts = [t[:n] for t, n in zip(license_snippets(corpora, 5, 600), (80, 600, 230, 410, 50))]
    uri = write_jsonl(tmp_path / "general.jsonl", [{"text": t} for t in texts])
    spec = evaluation(suite("general", "general", uri, "perplexity"),
                      suite("general-nll", "custom", uri, "nll"))
    results = Evaluator(spec, tokenizer, device=CPU, seq_len=512).evaluate(model)

    total, count = reference_nll(model, tokenizer, texts)
    assert results["general-nll.nll"] == pytest.approx(total / count, rel=1e-5)
    assert results["general.perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bits_per_byte_scores_every_token_of_the_text_per_utf8_byte(tiny, corpora, tmp_path: Path) -> None:
    model, tokenizer = tiny
    # umlauts: more bytes than characters, so a per-character count would come out differently
    texts = [t[:n] + " Übersetzung größer" for t, n in zip(license_snippets(corpora, 3, 300), (60, 300, 140))]
    uri = write_jsonl(tmp_path / "domain.jsonl", [{"text": t} for t in texts])
    spec = evaluation(suite("domain", "domain", uri, "bits_per_byte"))
    results = Evaluator(spec, tokenizer, device=CPU, seq_len=512).evaluate(model)

    # the first token too is predicted, from an EOS before it
    total, _ = reference_nll(model, tokenizer, texts, lead=[tokenizer.eos_token_id])
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)
    assert results["domain.bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)


def test_long_documents_are_scored_in_overlapping_windows(tiny, corpora, tmp_path: Path) -> None:
    model, tokenizer = tiny
    text = license_snippets(corpora, 1, 3000)[0]
    (tmp_path / "doc.txt").write_text(text)
    spec = evaluation(suite("domain", "domain", tmp_path / "doc.txt", "nll", format="text"))
    got = Evaluator(spec, tokenizer, device=CPU, seq_len=64).evaluate(model)["domain.nll"]

    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pieces = windows(ids, 64)
    # Every token but the first is predicted exactly once.
    assert sum(len(w) - 1 for w in pieces) == len(ids) - 1
    assert [t for w in pieces for t in w[1:]] == ids[1:]
    total = sum(reference_nll_ids(model, w) for w in pieces)
    assert got == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def reference_nll_ids(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        x = torch.tensor([ids])
        logp = F.log_softmax(model(input_ids=x).logits.float()[0, :-1], dim=-1)
        return -logp.gather(1, x[0, 1:, None]).sum().item()


def test_repeated_calls_agree_and_training_mode_is_restored(tiny, corpora, tmp_path: Path) -> None:
    model, tokenizer = tiny
    uri = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in license_snippets(corpora, 4, 900)])
    spec = evaluation(suite("domain", "domain", uri, "perplexity"))
    evaluator = Evaluator(spec, tokenizer, device=CPU, seq_len=128)
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately frozen in eval mode stays so
    try:
        first, second = evaluator.evaluate(model), evaluator.evaluate(model)
        assert first == second
        assert model.training and not model.model.layers[0].training
        assert model.model.layers[1].training
    finally:
        model.eval()
    assert evaluator.evaluate(model) == first
    assert not model.training
