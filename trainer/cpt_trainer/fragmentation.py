"""How badly the tokenizer fragments a domain's frequent terms, and what extension would save.

Terms. Words are runs of letters, digits and underscores with inner hyphens kept
(`sub-licensable`, `max_len`), at least `min_chars` long and holding a letter. A *domain term*
is frequent in the domain sample (count ≥ `min_count`) and rare in the general one: its rate
per word in the domain sample is at least `min_ratio` times its smoothed rate in the general
sample, `(f_g + 0.5) / N_g`; without a general sample every frequent word is a candidate. The
`max_terms` most frequent domain terms are analysed.

Fragmentation (shared/MISSION.md §6). `r(u)` is the number of sub-tokens the tokenizer uses
for `u` in running text, i.e. after a space (`len(tok("a " + u)) − len(tok("a"))`: a
space-prefixed word is how most occurrences look to byte-level BPE and SentencePiece alike, and
word-splitting pre-tokenisers never merge across the space). Then

    r̄ = Σ f(u)·r(u) / Σ f(u)

over the analysed terms. The tokens the domain sample spends on splitting (`excess`) count
every occurrence. A new token, though, is the running form: it matches only where the term
follows a space, not at the start of a line or after a bracket (a section heading of a manual
page never matches). Adding `u` as one token therefore saves `f_run(u)·(r(u) − 1)` tokens, with
`f_run(u)` the occurrences after a space; candidates are ranked by that saving (then by term, for
a stable order).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from transformers import PreTrainedTokenizerBase

_WORD = re.compile(r"\w+(?:-\w+)*")
_ANCHOR = "a"
GENERAL_SMOOTHING = 0.5


@dataclass(frozen=True)
class TermStats:
    term: str
    count: int
    """Occurrences in the domain sample: f(u)."""
    general_count: int
    keyness: float
    """Domain rate / smoothed general rate (inf without a general sample)."""
    pieces: tuple[str, ...]
    """The sub-tokens of the term after a space."""
    running: int | None = None
    """Occurrences after a space, where a new token of the term would match (None: all of them)."""

    @property
    def r(self) -> int:
        return len(self.pieces)

    @property
    def cost(self) -> int:
        """Tokens spent on splitting the term, over every occurrence."""
        return self.count * (self.r - 1)

    @property
    def saving(self) -> int:
        """Tokens a new token of the term would save: its occurrences after a space."""
        return (self.count if self.running is None else self.running) * (self.r - 1)


@dataclass(frozen=True)
class FragmentationReport:
    terms: tuple[TermStats, ...]
    """Analysed domain terms, most frequent first."""
    domain_words: int
    domain_tokens: int
    """Tokens of the whole domain sample (what the saving is a share of)."""
    r_bar: float
    candidates: tuple[TermStats, ...] = field(default=())
    """Terms with r > 1, largest saving first (at most `top`)."""
    top: int = 20

    @property
    def saving(self) -> int:
        """Tokens the listed candidates would save together."""
        return sum(c.saving for c in self.candidates)

    @property
    def saving_share(self) -> float:
        return self.saving / self.domain_tokens if self.domain_tokens else 0.0

    @property
    def excess(self) -> int:
        """Tokens the domain sample spends on splitting its frequent terms: Σ f(u)·(r(u) − 1)
        over every analysed term. Unlike r̄, it weighs a term by the tokens its pieces cost, so a
        long, often split term counts for more than a frequent short word that is whole."""
        return sum(t.cost for t in self.terms)

    @property
    def excess_share(self) -> float:
        return self.excess / self.domain_tokens if self.domain_tokens else 0.0

    def to_dict(self) -> dict[str, object]:
        def term(t: TermStats) -> dict[str, object]:
            return {**asdict(t), "pieces": list(t.pieces), "r": t.r, "cost": t.cost, "saving": t.saving}

        return {"r_bar": self.r_bar, "domain_words": self.domain_words,
                "domain_tokens": self.domain_tokens, "terms_analysed": len(self.terms),
                "excess": self.excess, "excess_share": self.excess_share,
                "saving": self.saving, "saving_share": self.saving_share,
                "candidates": [term(t) for t in self.candidates],
                "frequent_terms": [term(t) for t in self.terms[:self.top]]}


def words(text: str, min_chars: int = 3, after_space: bool = False) -> Iterable[str]:
    """The words of `text`; with `after_space`, only those right after a space (running form)."""
    for match in _WORD.finditer(text):
        word = match.group()
        if after_space and text[match.start() - 1:match.start()] != " ":
            continue
        if len(word) >= min_chars and any(c.isalpha() for c in word):
            yield word


def count_words(texts: Iterable[str], min_chars: int = 3, after_space: bool = False) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(words(text, min_chars, after_space))
    return counts


def domain_terms(domain: Counter[str], general: Counter[str] | None, *, min_count: int = 3,
                 min_ratio: float = 5.0, max_terms: int = 500) -> list[tuple[str, int, int, float]]:
    """(term, f_domain, f_general, keyness) of the most frequent domain terms."""
    n_domain = max(1, sum(domain.values()))
    n_general = sum(general.values()) if general else 0
    picked = []
    for term, count in domain.items():
        if count < min_count:
            continue
        g = general.get(term, 0) if general else 0
        keyness = ((count / n_domain) / ((g + GENERAL_SMOOTHING) / n_general)
                   if n_general else float("inf"))
        if keyness >= min_ratio:
            picked.append((term, count, g, keyness))
    picked.sort(key=lambda t: (-t[1], t[0]))
    return picked[:max_terms]


def subtokens(tokenizer: PreTrainedTokenizerBase, term: str) -> tuple[str, ...]:
    """The pieces of `term` in running text (see the module docstring)."""
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"{_ANCHOR} {term}", add_special_tokens=False)["input_ids"]
    if ids[:len(anchor)] == anchor and len(ids) > len(anchor):
        ids = ids[len(anchor):]
    else:  # a tokenizer that merged across the space: fall back to the bare word
        ids = tokenizer(term, add_special_tokens=False)["input_ids"]
    return tuple(tokenizer.convert_ids_to_tokens(ids))


def analyze(tokenizer: PreTrainedTokenizerBase, domain_texts: Sequence[str],
            general_texts: Sequence[str] | None = None, *, top: int = 20, min_count: int = 3,
            min_ratio: float = 5.0, max_terms: int = 500, min_chars: int = 3) -> FragmentationReport:
    domain = count_words(domain_texts, min_chars)
    general = count_words(general_texts, min_chars) if general_texts else None
    picked = domain_terms(domain, general, min_count=min_count, min_ratio=min_ratio,
                          max_terms=max_terms)
    running = count_words(domain_texts, min_chars, after_space=True)
    terms = tuple(TermStats(t, f, g, k, subtokens(tokenizer, t), running[t]) for t, f, g, k in picked)
    weight = sum(t.count for t in terms)
    r_bar = sum(t.count * t.r for t in terms) / weight if weight else float("nan")
    ranked = sorted((t for t in terms if t.r > 1), key=lambda t: (-t.saving, t.term))[:top]
    return FragmentationReport(terms=terms, domain_words=sum(domain.values()),
                               domain_tokens=_token_count(tokenizer, domain_texts),
                               r_bar=r_bar, candidates=tuple(ranked), top=top)


def _token_count(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> int:
    from .data.tokenization import encode_texts

    return sum(len(ids) for ids in encode_texts(tokenizer, list(texts)))


def format_terms(terms: Sequence[TermStats]) -> list[str]:
    """A plain-text table of terms: count (after a space: where a new token matches), r(u),
    saving and the pieces."""
    width = max([len("term")] + [len(t.term) for t in terms])
    lines = [f"    {'term':<{width}}  {'count':>7}  {'after space':>11}  {'r':>3}  {'saving':>7}  pieces"]
    for t in terms:
        spaced = t.count if t.running is None else t.running
        lines.append(f"    {t.term:<{width}}  {t.count:>7}  {spaced:>11}  {t.r:>3}  {t.saving:>7}  "
                     f"{' '.join(t.pieces)}")
    return lines
