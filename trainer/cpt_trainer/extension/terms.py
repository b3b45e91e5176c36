"""Which terms become tokens, and in what form.

The rule for a new token. A term `u` is added in its running-text form: the one pre-token the
tokenizer's own normaliser and pre-tokeniser make of `u` after a space (`"a u"` minus `"a"`),
which is `Ġu` for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and `▁u` for a word-splitting
Metaspace. That string becomes an ordinary BPE vocabulary entry (`tokenizer.py`), so the new
token replaces exactly the occurrences of `u` that `fragmentation.py` counts (a word after a
space, as running text uses it) and nothing else: `sublicensable,` and `x sublicensable` use
it; `sublicensablex`, `(sublicensable` and a line that starts with the term keep their old
pieces. Added tokens would not do: they are matched in the raw text before pre-tokenisation,
so `" license"` would also swallow the start of `" licensed"`, and `single_word` rejects the
leading space it needs.

A term whose running form is several pre-tokens (`max-len`) cannot be one token: named terms
are refused, top-K candidates skipped. Terms that are already one token are skipped.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from cpt_api.spec import SourceRole, TokenizerExtensionSpec
from cpt_api.trainer_config import TrainerConfig

from ..errors import Refused
from ..fragmentation import analyze

log = logging.getLogger(__name__)

SAMPLE_BYTES = 64 << 20
"""Domain bytes read for top-K analysis (whole files, in listing order): frequent terms show up
long before that, and a restore has to read it again."""
_ANCHOR = "a"


def running_form(tokenizer: PreTrainedTokenizerBase, term: str) -> str:
    """The single pre-token of `term` after a space; raises ValueError when there is none."""
    backend = tokenizer.backend_tokenizer
    if backend.pre_tokenizer is None:
        raise ValueError("the tokenizer has no pre-tokeniser, so it has no notion of a word")

    def pretokens(text: str) -> list[str]:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]

    anchor, pieces = pretokens(_ANCHOR), pretokens(f"{_ANCHOR} {term}")
    rest = pieces[len(anchor):]
    if pieces[:len(anchor)] != anchor or len(rest) != 1:
        raise ValueError(f"{term!r} is {len(rest)} pre-tokens {rest} in running text, not one")
    return rest[0]


def select_terms(spec: TokenizerExtensionSpec, tokenizer: PreTrainedTokenizerBase,
                 domain: Sequence[str] = (), general: Sequence[str] | None = None) -> list[str]:
    """Named terms in spec order, then the top K analysis candidates (largest saving first)
    that can become one token. Deterministic for the same tokenizer and sample."""
    vocab = tokenizer.get_vocab()
    chosen: list[str] = []
    for term in dict.fromkeys(spec.terms):
        try:
            form = running_form(tokenizer, term)
        except ValueError as exc:
            raise Refused(f"tokenizer.extend.terms: {exc}: it cannot become one token") from exc
        if form in vocab:
            log.info("term %r is already one token (%s)", term, form)
        else:
            chosen.append(term)
    if spec.top_k:
        report = analyze(tokenizer, domain, general, top=4 * spec.top_k,
                         max_terms=max(500, 8 * spec.top_k))
        picked = 0
        for cand in report.candidates:
            if picked == spec.top_k:
                break
            if cand.term in chosen or not _eligible(tokenizer, cand.term, vocab):
                continue
            chosen.append(cand.term)
            picked += 1
    return chosen


def _eligible(tokenizer: PreTrainedTokenizerBase, term: str, vocab: dict[str, int]) -> bool:
    try:
        return running_form(tokenizer, term) not in vocab
    except ValueError:
        return False


def domain_sample(cfg: TrainerConfig) -> tuple[list[str], list[str]]:
    """(domain, replay) texts for the analysis: whole units (files, JSONL ranges, row groups)
    in listing order up to SAMPLE_BYTES read per role, with the data pipeline's own reader."""
    from ..data.report import CurationReport
    from ..data.sources import SourceReader

    out: dict[SourceRole, list[str]] = {SourceRole.domain: [], SourceRole.replay: []}
    for role, texts in out.items():
        budget = SAMPLE_BYTES
        for source in (s for s in cfg.spec.data.sources if s.role == role):
            reader = SourceReader(source, CurationReport())
            for unit in reader.units:
                if reader.bytes_read >= budget:
                    break
                texts.extend(d.text for d in reader.documents(unit))
            budget -= reader.bytes_read
    return out[SourceRole.domain], out[SourceRole.replay]


__all__ = ["SAMPLE_BYTES", "domain_sample", "running_form", "select_terms"]
