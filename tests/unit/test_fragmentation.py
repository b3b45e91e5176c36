"""Fragmentation of domain terms: term selection, r(u), r̄ and savings on the tiny tokenizer."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from cpt_trainer.fragmentation import analyze, count_words, domain_terms, subtokens, words


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def texts_of(directory: Path) -> list[str]:
    return [p.read_text() for p in sorted(directory.glob("*.txt"))]


def general_texts(corpora: dict[str, Path]) -> list[str]:
    lines = (corpora["replay"] / "stdlib.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.mark.parametrize("text, expected", [
    pytest.param("sub-licensable works", ["sub-licensable", "works"], id="inner hyphens are kept"),
    pytest.param("GPL-2 and GPL-3", ["GPL-2", "and", "GPL-3"], id="versions stay with the name"),
    pytest.param("in 1991, an 2-3 of", [], id="short words and numbers are not terms"),
    pytest.param("max_len=os.path", ["max_len", "path"], id="dots separate, underscores join"),
])
def test_words(text: str, expected: list[str]) -> None:
    assert list(words(text)) == expected


def test_domain_terms_are_frequent_in_the_domain_and_rare_in_general() -> None:
    domain = Counter({"licensee": 40, "the": 400, "warranty": 30, "rare": 2})
    general = Counter({"the": 4000, "warranty": 1, "python": 500})
    general["filler"] = 10_000 - sum(general.values())
    picked = domain_terms(domain, general, min_count=3, min_ratio=5.0)
    assert [t[0] for t in picked] == ["licensee", "warranty"]
    term, f_d, f_g, keyness = picked[1]
    assert (f_d, f_g) == (30, 1)
    assert keyness == pytest.approx((30 / 472) / ((1 + 0.5) / 10_000))
    # Without a general sample, every frequent word is a domain term, most frequent first.
    assert [t[0] for t in domain_terms(domain, None)] == ["the", "licensee", "warranty"]


def test_subtokens_are_the_pieces_of_the_term_after_a_space(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for term in ["License", "MERCHANTABILITY", "sublicense", "Corresponding"]:
        pieces = subtokens(tokenizer, term)
        assert tokenizer.convert_tokens_to_string(list(pieces)) == " " + term
        assert list(pieces) == tokenizer.tokenize(" " + term)


def test_r_bar_and_savings_match_an_independent_count(tokenizer, corpora) -> None:  # type: ignore[no-untyped-def]
    domain, general = texts_of(corpora["domain"]), general_texts(corpora)
    report = analyze(tokenizer, domain, general, top=10, max_terms=200)
    assert report.terms and len(report.candidates) == 10

    joined = "\n".join(domain)
    total_f = total_fr = 0
    for t in report.terms:
        # Whole-word occurrences (a hyphen joins words only between word characters), and r(u)
        # from the tokenizer directly.
        f = len(re.findall(rf"(?<!\w)(?<!\w-){re.escape(t.term)}(?!\w|-\w)", joined))
        running = len(re.findall(rf"(?<= ){re.escape(t.term)}(?!\w|-\w)", joined))  # after a space
        r = len(tokenizer.tokenize(" " + t.term))
        assert (t.count, t.running, t.r) == (f, running, r)
        total_f, total_fr = total_f + f, total_fr + f * r
    assert report.r_bar == pytest.approx(total_fr / total_f)

    savings = [c.saving for c in report.candidates]
    assert savings == sorted(savings, reverse=True)
    assert all(c.saving == c.running * (c.r - 1) and c.r > 1 for c in report.candidates)
    assert report.excess == sum(t.count * (t.r - 1) for t in report.terms)
    best_outside = max((t.saving for t in report.terms if t not in report.candidates), default=0)
    assert best_outside <= savings[-1]
    assert report.saving == sum(savings)
    assert report.domain_tokens == sum(len(tokenizer(t)["input_ids"]) for t in domain)


def test_the_general_sample_removes_shared_vocabulary(tokenizer, corpora) -> None:  # type: ignore[no-untyped-def]
    domain, general = texts_of(corpora["domain"]), general_texts(corpora)
    kept = analyze(tokenizer, domain, general, max_terms=10_000).terms
    alone = {t.term for t in analyze(tokenizer, domain, None, max_terms=10_000).terms}
    with_general = {t.term for t in kept}
    assert with_general < alone
    assert "the" in alone and "the" not in with_general  # frequent in Python docstrings as well
    shared, n_general = count_words(general), sum(count_words(general).values())
    n_domain = sum(count_words(domain).values())
    for t in kept:
        assert t.general_count == shared[t.term]
        assert (t.count / n_domain) / ((shared[t.term] + 0.5) / n_general) >= 5.0


def test_the_report_is_deterministic_and_serialisable(tokenizer, corpora) -> None:  # type: ignore[no-untyped-def]
    domain = texts_of(corpora["domain"])
    a, b = analyze(tokenizer, domain, top=5), analyze(tokenizer, list(domain), top=5)
    assert a == b
    doc = json.loads(json.dumps(a.to_dict()))
    assert [c["term"] for c in doc["candidates"]] == [c.term for c in a.candidates]
    assert doc["candidates"][0]["saving"] == a.candidates[0].saving


def test_the_analyze_command(tiny_model_dir: Path, corpora, capsys) -> None:  # type: ignore[no-untyped-def]
    from cpt_trainer.tokenizer_tools import main

    args = ["analyze", "--tokenizer", str(tiny_model_dir), "--domain", str(corpora["domain"]),
            "--general", str(corpora["replay"] / "stdlib.jsonl"), "--top", "3"]
    assert main(args + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["candidates"]) == 3 and doc["r_bar"] >= 1
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"r̄ = {doc['r_bar']:.2f}" in text and doc["candidates"][0]["term"] in text
    assert main(["analyze", "--domain", str(corpora["domain"])]) == 2
    assert "--tokenizer URI or --base URI" in capsys.readouterr().err


def test_a_new_token_saves_only_where_the_term_follows_a_space(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A manual page's section heading starts a line: splitting it costs tokens there, but the
    running-form token an extension adds never matches it."""
    pages = ["NAME\nBESCHREIBUNG\nDas Programm liest die Datei und wird mit der BESCHREIBUNG gestartet.\n"] * 4
    (term,) = [t for t in analyze(tokenizer, pages, None, min_count=3, max_terms=500).terms
               if t.term == "BESCHREIBUNG"]
    assert (term.count, term.running) == (8, 4)
    assert term.cost == 8 * (term.r - 1) and term.saving == 4 * (term.r - 1)

