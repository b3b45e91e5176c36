"""Generation suites on the tiny model: real greedy decoding, scored by the documented rules."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from cpt_trainer.evals import Evaluator
from cpt_trainer.evals.generation import render_prompt
from cpt_trainer.evals.scoring import has_json_object

from .conftest import evaluation, suite, write_jsonl

CPU = torch.device("cpu")
PROMPTS = ["Return a JSON object describing the license:", "Permission is hereby granted",
           "def main(", "THE SOFTWARE IS PROVIDED"]


def manual_greedy(model: torch.nn.Module, ids: list[int], steps: int, eos: int) -> list[int]:
    """Argmax decoding with a full forward pass per token: no cache, no batching, no padding."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == eos:
                break
    return out


def test_generations_match_plain_greedy_decoding_and_are_scored(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    expected = [tokenizer.decode(manual_greedy(model, tokenizer(p)["input_ids"], 12,
                                               tokenizer.eos_token_id), skip_special_tokens=True)
                for p in PROMPTS]
    # A pattern built from the expected output must match; a shifted one must not.
    records = [{"prompt": p, "pattern": re.escape(e.lstrip()[:6]) if i % 2 == 0 else r"\{NEVER"}
               for i, (p, e) in enumerate(zip(PROMPTS, expected))]
    uri = write_jsonl(tmp_path / "behavior.jsonl", records)
    spec = evaluation(suite("json", "behavior", uri, "json_valid", field="prompt", max_new_tokens=12),
                      suite("fmt", "behavior", uri, "format_follow", field="prompt", max_new_tokens=12))
    evaluator = Evaluator(spec, tokenizer, device=CPU, seq_len=256)
    results = evaluator.evaluate(model)

    assert evaluator.last_generations["json"] == expected
    assert results["json.json_valid"] == sum(map(has_json_object, expected)) / len(expected)
    assert results["fmt.format_follow"] == 0.5
    assert evaluator.evaluate(model) == results


def write_classifier(tmp_path: Path, monkeypatch, body: str) -> str:  # type: ignore[no-untyped-def]
    (tmp_path / "my_refusals.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_refusals", None)
    return "my_refusals:classify"


def test_a_custom_refusal_classifier_replaces_the_keyword_one(tiny, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    uri = write_jsonl(tmp_path / "safety.jsonl", [{"text": p} for p in PROMPTS])
    path = write_classifier(tmp_path, monkeypatch,
                            "SEEN = []\ndef classify(text):\n    SEEN.append(text)\n    return True\n")
    spec = evaluation(suite("keywords", "safety", uri, "refusal_rate", max_new_tokens=6),
                      suite("custom", "safety", uri, "refusal_rate", max_new_tokens=6,
                            refusal_classifier=path))
    evaluator = Evaluator(spec, tokenizer, device=CPU, seq_len=128)
    results = evaluator.evaluate(model)

    import my_refusals  # type: ignore[import-not-found]
    seen = my_refusals.SEEN
    assert results["custom.refusal_rate"] == 1.0
    assert seen == evaluator.last_generations["custom"]
    # A random model does not write refusal phrases; the keyword classifier says so.
    assert results["keywords.refusal_rate"] == 0.0


def test_prompts_go_through_the_chat_template_when_there_is_one(tiny) -> None:
    _, tokenizer = tiny
    chat = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    chat.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rendered = chat.decode(render_prompt(chat, "Hello"))
    assert rendered == "<|user|>Hello\n<|assistant|>"
    assert tokenizer.decode(render_prompt(tokenizer, "Hello")) == "Hello"
