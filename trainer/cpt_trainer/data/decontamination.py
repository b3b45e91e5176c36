"""Decontamination: training documents must not contain evaluation text.

An evaluation passage leaks into training when a training document shares an n-gram of n
consecutive words with it (n = curation.decontaminationNgram, 13 by default as in GPT-3's
decontamination). Words are lower-cased runs of letters and digits, so whitespace,
punctuation and case differences do not hide a copy. Evaluation texts shorter than n words
yield no n-gram and cannot be matched; keep n below the length of the shortest eval passage.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> Iterator[str]:
    words = _WORD.findall(text.lower())
    for i in range(len(words) - n + 1):
        yield " ".join(words[i:i + n])


class Decontaminator:
    def __init__(self, eval_texts: Iterable[str], n: int):
        self.n = n
        # Python's string hash is salted per process, which is fine: the set never leaves it.
        self._grams = {hash(g) for text in eval_texts for g in ngrams(text, n)}

    def __bool__(self) -> bool:
        return bool(self._grams)

    def shared_ngram(self, text: str) -> str | None:
        """The first n-gram the text shares with an eval set, or None."""
        for gram in ngrams(text, self.n):
            if hash(gram) in self._grams:
                return gram
        return None
