"""Quality rules on each document: datatrove's Gopher and FineWeb filters, per source.

The rules themselves are datatrove's (`GopherQualityFilter`, `FineWebQualityFilter`), so their
definitions and reasons (`gopher_below_alpha_threshold`, `line_punct_ratio`, ...) are the ones
the data-preparation literature and the FineWeb pipelines use. Only the word splitting is ours:
datatrove splits words with spaCy (a ~300 MB dependency and a pipeline per language), and these
rules only count words, their lengths and letters, for which a Unicode regex (a run of word
characters, or a run of symbols) gives the same verdicts on prose and on junk.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from datatrove.data import Document as DatatroveDocument
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.fineweb_quality_filter import FineWebQualityFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.utils.word_tokenizers import WordTokenizer

from cpt_api.spec import QualitySpec

_WORD = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]+")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”»]?(?=\s|$)|\n{2,}")

Verdict = tuple[str, str] | None


class RegexWords(WordTokenizer):  # type: ignore[misc]  # datatrove is untyped
    """Words as runs of letters/digits (with inner apostrophes and hyphens) and runs of symbols."""

    def word_tokenize(self, text: str) -> list[str]:
        return list(_WORD.findall(text))

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.span_tokenize(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in _SENTENCE_END.finditer(text):
            spans.append((start, match.end()))
            start = match.end()
        if start < len(text):
            spans.append((start, len(text)))
        return spans


def filters(spec: QualitySpec) -> list[BaseFilter]:
    """datatrove's filters configured from the spec, in the order they run."""
    words = RegexWords()
    out: list[BaseFilter] = [GopherQualityFilter(
        min_doc_words=spec.min_words, max_doc_words=spec.max_words,
        min_avg_word_length=spec.min_mean_word_length, max_avg_word_length=spec.max_mean_word_length,
        max_symbol_word_ratio=spec.max_symbol_word_ratio, max_bullet_lines_ratio=spec.max_bullet_lines_ratio,
        max_ellipsis_lines_ratio=spec.max_ellipsis_lines_ratio,
        max_non_alpha_words_ratio=spec.min_alpha_words_ratio,  # datatrove's name; it is a minimum
        min_stop_words=spec.min_stop_words, stop_words=spec.stop_words, language=words)]
    if spec.fineweb:
        out.append(FineWebQualityFilter(language=words))
    return out


def check(spec: QualitySpec) -> Callable[[str], Verdict]:
    """A document's verdict under `spec`: None to keep it, else (rule, reason), the rule named
    as datatrove names it (`gopher_below_alpha_threshold`, `line_punct_ratio`, ...)."""
    steps = filters(spec)

    def verdict(text: str) -> Verdict:
        if not _WORD.search(text):
            return "gopher_short_doc", "no words"
        doc = DatatroveDocument(text=text, id="")
        for step in steps:
            result = step.filter(doc)
            kept, rule = result if isinstance(result, tuple) else (result, None)
            if not kept:
                rule = rule or type(step).__name__
                return rule, f"{type(step).__name__}: {rule}"
        return None

    return verdict


__all__ = ["RegexWords", "Verdict", "check", "filters"]
