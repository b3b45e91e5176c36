"""kl_to_base: zero against itself, positive once the weights move, exact on a hand check."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpt_trainer.errors import Refused
from cpt_trainer.evals import Evaluator

from .conftest import evaluation, suite, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture
def chat_suite(tmp_path: Path):  # type: ignore[no-untyped-def]
    uri = write_jsonl(tmp_path / "chat.jsonl", [
        {"text": "What does the GPL require?", "response": " It requires source to be offered."},
        {"text": "Summarise the MIT license."},  # no response: the base's own is used
        {"text": "Is warranty disclaimed?", "response": " Yes, entirely."},
    ])
    return evaluation(suite("chat", "drift", uri, "kl_to_base", max_new_tokens=8))


def test_the_base_has_no_drift_from_itself(tiny, chat_suite) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    evaluator = Evaluator(chat_suite, tokenizer, device=CPU, seq_len=128, reference=model)
    assert evaluator.evaluate(model) == {"chat.kl_to_base": 0.0}


def test_perturbed_weights_drift_and_the_value_matches_a_hand_computation(
        tiny, fresh_model, chat_suite) -> None:  # type: ignore[no-untyped-def]
    base, tokenizer = tiny
    with torch.no_grad():
        fresh_model.model.layers[-1].mlp.down_proj.weight.add_(
            0.05 * torch.randn_like(fresh_model.model.layers[-1].mlp.down_proj.weight,
                                    generator=torch.Generator().manual_seed(1)))
    evaluator = Evaluator(chat_suite, tokenizer, device=CPU, seq_len=128, reference=base)
    drift = evaluator.evaluate(fresh_model)["chat.kl_to_base"]
    assert drift > 0

    # Hand check on the first record: KL(p_base || p_theta) at the positions predicting the
    # given response, averaged with the other records' positions.
    total, count = 0.0, 0
    for ids, prompt_len in evaluator._drift(chat_suite.suites[0]):
        x = torch.tensor([ids])
        with torch.no_grad():
            lb = F.log_softmax(base(input_ids=x).logits[0], -1)
            lt = F.log_softmax(fresh_model(input_ids=x).logits[0], -1)
        kl = (lb.exp() * (lb - lt)).sum(-1)[prompt_len - 1:len(ids) - 1]
        total, count = total + kl.sum().item(), count + len(kl)
    assert drift == pytest.approx(total / count, rel=1e-4)

    first_ids, first_prompt_len = evaluator._drift(chat_suite.suites[0])[0]
    response = tokenizer(" It requires source to be offered.", add_special_tokens=False)["input_ids"]
    assert first_ids[first_prompt_len:] == response


def test_a_drift_suite_needs_the_reference(tiny, chat_suite) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = tiny
    assert chat_suite.needs_reference
    with pytest.raises(Refused, match="reference"):
        Evaluator(chat_suite, tokenizer, device=CPU, seq_len=128)
