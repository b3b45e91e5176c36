"""Reading suites: fixed order, max_samples, texts for decontamination, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cpt_trainer.evals import EvalDataError, Evaluator

from .conftest import evaluation, suite, write_jsonl

CPU = torch.device("cpu")


def test_samples_come_in_sorted_file_order_and_stop_at_max_samples(tiny, tmp_path: Path) -> None:
    _, tokenizer = tiny
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "2.txt").write_text("second file")
    (tmp_path / "p" / "1.txt").write_text("first file")
    chat = write_jsonl(tmp_path / "chat" / "c.jsonl", [{"text": "q1", "response": "r1"}, {"text": "q2"}])
    spec = evaluation(suite("general", "general", f"{tmp_path}/*.jsonl", "nll", max_samples=3),
                      suite("plain", "domain", tmp_path / "p", "nll", format="text"),
                      suite("chat", "drift", chat, "kl_to_base"))
    evaluator = Evaluator(spec, tokenizer, device=CPU, seq_len=64, reference=torch.nn.Linear(1, 1))
    # Given responses are evaluation text too: training data must not contain them either.
    assert evaluator.texts() == ["a1", "a2", "b1", "first file", "second file", "q1", "r1", "q2"]


@pytest.mark.parametrize("setup, uri, fmt, message", [
    pytest.param(None, "missing.jsonl", "jsonl", "does not exist", id="a missing file"),
    pytest.param(None, "nothing-*.jsonl", "jsonl", "no file matches", id="a glob matching nothing"),
    pytest.param({"empty.jsonl": ""}, "empty.jsonl", "jsonl", "holds no samples", id="an empty file"),
    pytest.param({"blank.txt": "  \n"}, "blank.txt", "text", "holds no samples", id="a blank text file"),
    pytest.param({"bad.jsonl": '{"text": "ok"}\n{"text": \n'}, "bad.jsonl", "jsonl",
                 r"bad.jsonl:2: malformed JSON", id="a malformed line names file and line"),
    pytest.param({"f.jsonl": '{"body": "x"}\n'}, "f.jsonl", "jsonl", "field 'text' is missing",
                 id="a record without the field"),
    pytest.param({"l.txt": b"caf\xe9"}, "l.txt", "text", "not valid UTF-8", id="latin-1 text"),
])
def test_unreadable_suites_are_clear_errors(tiny, tmp_path: Path, setup, uri: str, fmt: str,  # type: ignore[no-untyped-def]
                                            message: str) -> None:
    _, tokenizer = tiny
    for name, content in (setup or {}).items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    spec = evaluation(suite("general", "general", tmp_path / uri, "perplexity", format=fmt))
    with pytest.raises(EvalDataError, match=message) as err:
        Evaluator(spec, tokenizer, device=CPU, seq_len=64)
    assert "suite 'general'" in str(err.value)


@pytest.mark.parametrize("record, message", [
    pytest.param({"text": "p"}, "needs a 'pattern' field", id="no pattern"),
    pytest.param({"text": "p", "pattern": "(unclosed"}, "not a valid regex", id="a broken regex"),
])
def test_format_follow_needs_a_valid_pattern_per_record(tiny, tmp_path: Path, record, message: str) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = tiny
    uri = write_jsonl(tmp_path / "b.jsonl", [record])
    spec = evaluation(suite("fmt", "behavior", uri, "format_follow"))
    with pytest.raises(EvalDataError, match=message):
        Evaluator(spec, tokenizer, device=CPU, seq_len=64)


def test_a_suite_digest_follows_what_is_measured_not_where_the_files_are(tmp_path: Path) -> None:
    from cpt_trainer.evals.data import load_samples, suite_digest

    records = [{"text": "Return JSON:", "response": "{}"}, {"text": "Name a colour."}]
    here = write_jsonl(tmp_path / "a" / "chat.jsonl", records)
    there = write_jsonl(tmp_path / "b" / "moved.jsonl", records)
    edited = write_jsonl(tmp_path / "c" / "chat.jsonl", [records[0], {"text": "Name a color."}])

    def digest(uri: Path, name: str = "chat", **extra: object) -> str:
        spec = suite(name, "drift", uri, "kl_to_base", **extra)
        return suite_digest(spec, load_samples(spec))

    assert digest(here) == digest(there, name="renamed")
    assert digest(here) != digest(edited)
    assert digest(here) != digest(here, maxNewTokens=8)
    assert digest(here) != digest(here, maxSamples=1)
