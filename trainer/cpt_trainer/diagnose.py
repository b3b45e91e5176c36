"""`cptctl diagnose`: is continued pretraining the right lever for this domain?

Measures, before anyone spends GPU hours (shared/MISSION.md §1, §6), on a domain sample and a
general sample:

1. how hard the base finds each, in **bits per byte**: the summed NLL of the scored tokens over
   the UTF-8 bytes they cover (and, for reference, perplexity per token and per word). Per-token
   perplexity cannot be compared across texts that tokenize differently: a language the
   tokenizer barely knows is cut into many more, individually easier tokens, so per token it can
   look as easy as English while each byte (each word) of it is much harder. The *gap* is the
   domain's bits per byte over the general sample's;
2. how much of the domain's tokens the tokenizer spends on splitting frequent domain terms,
   `excess share` = Σ f(u)·(r(u) − 1) / domain tokens (`fragmentation.py`), and what extending
   it by the top terms would save.

Rules (the thresholds are options; the report states them and which signal decided):

- gap ≥ `--gap-threshold` (1.5): **CPT warranted** (decided by bits per byte). Tokenizer
  extension is worth measuring as well when the top terms would save ≥ `--saving-threshold`
  (2%) of the domain tokens.
- gap ≥ `--weak-gap` (1.2), or fragmentation costing ≥ `--fragmentation-threshold` (10%) of the
  domain tokens: **borderline**: prompting with domain context / RAG first, then a small CPT pilot
  under gates.
- otherwise **CPT not indicated**: the base models the domain about as well as general text;
  remaining problems are likely behaviour (SFT), freshness (RAG) or prompting.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import Refused
from .fragmentation import FragmentationReport, analyze, format_terms


@dataclass(frozen=True)
class Thresholds:
    gap: float = 1.5
    weak_gap: float = 1.2
    fragmentation: float = 0.10
    """Share of the domain tokens spent on splitting frequent domain terms."""
    saving: float = 0.02


WHY = {
    "gap": "bits per byte 1.5x the general text's is a gap of the size CPT closes (a language or jargon the "
           "base saw little of); below 1.2x the base already models the domain about as well",
    "fragmentation": "when splitting frequent domain terms costs a tenth of the domain's tokens, context and "
                     "compute go to word pieces (a language the tokenizer was not built for: German 24%; "
                     "English jargon with hyphenated names stays near 5%)",
    "saving": "an extension of the top terms must save at least 2% of the domain tokens to be worth its new rows",
}
"""Why each default threshold is where it is (printed with the report)."""


@dataclass(frozen=True)
class Recommendation:
    verdict: str
    """`cpt`, `borderline` or `not-cpt`."""
    summary: str
    reasons: list[str] = field(default_factory=list)
    decided_by: str = "none"
    """`bits per byte`, `fragmentation` or `none` (neither signal reached its threshold)."""


ALWAYS = ("CPT changes knowledge and distribution; it does not fix behaviour (output format, tool "
          "protocol, tone, refusals: SFT) or freshness (RAG). Plan a small SFT and a safety "
          "evaluation after CPT.")


def recommend(bpb_domain: float, bpb_general: float, frag: FragmentationReport,
              th: Thresholds = Thresholds()) -> Recommendation:
    gap = bpb_domain / bpb_general
    fragmented = frag.excess_share >= th.fragmentation
    extension_pays = frag.saving_share >= th.saving
    reasons = [_gap_reason(gap, bpb_domain, bpb_general, th), _fragmentation_reason(frag, th)]
    if gap >= th.gap:
        verdict, decided = "cpt", "bits per byte"
        summary = "CPT warranted: the base lacks the domain's distribution (decided by bits per byte)"
        if extension_pays:
            reasons.append("tokenizer extension is worth measuring (`cptctl tokenizer analyze`): "
                           "its saving is above the threshold; extend only the listed terms")
    elif gap >= th.weak_gap or fragmented:
        verdict, decided = "borderline", "bits per byte" if gap >= th.weak_gap else "fragmentation"
        summary = ("borderline: try prompting with domain context or RAG first; if they fall short, "
                   f"run a small CPT pilot with general and safety gates (decided by {decided})")
    else:
        verdict, decided = "not-cpt", "none"
        summary = ("CPT not indicated: try prompting, RAG or SFT first; the base already models "
                   "the domain at least about as well as general text (no signal reached its threshold)")
    return Recommendation(verdict, summary, reasons + [ALWAYS], decided)


def _gap_reason(gap: float, bpb_domain: float, bpb_general: float, th: Thresholds) -> str:
    if gap >= th.gap:
        level = f"at least {th.gap:g}x: a large knowledge / distribution gap"
    elif gap >= th.weak_gap:
        level = f"between {th.weak_gap:g}x and {th.gap:g}x: a moderate gap"
    elif gap >= 1:
        level = f"below {th.weak_gap:g}x: no distribution gap to close"
    else:
        level = "the base already finds domain text easier than general text"
    return (f"domain text costs {bpb_domain:.3f} bits per byte, {gap:.2f}x the general text's "
            f"{bpb_general:.3f} ({level})")


def _fragmentation_reason(frag: FragmentationReport, th: Thresholds) -> str:
    if not frag.terms:
        return "no frequent domain-specific terms found in the sample (fragmentation not measured)"
    level = "costs" if frag.excess_share >= th.fragmentation else "costs only"
    return (f"splitting frequent domain terms {level} {frag.excess_share:.1%} of the domain tokens "
            f"(threshold {th.fragmentation:.0%}; r̄ = {frag.r_bar:.2f} pieces per occurrence); one token "
            f"per top-{len(frag.candidates)} term would save {frag.saving_share:.1%}")


def quiet_transformers() -> None:
    """Loading progress bars would interleave with the report on the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # unannotated in transformers


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: list[str], *, seq_len: int,
               max_tokens: int, device: torch.device) -> dict[str, float]:
    """Per token, per byte and per word, over the same scored tokens: every token of each
    document's first ⌈max_tokens / n⌉ but its first (nothing predicts it)."""
    from .evals.perplexity import document_ids, token_nll
    from .evals.runtime import inference

    docs = document_ids(tokenizer, texts, max_tokens=max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    began = time.monotonic()
    with inference(model, device, None):
        result = token_nll(model, docs, seq_len=seq_len, device=device, pad_id=int(pad))
    scored = [tokenizer.decode(ids[1:], skip_special_tokens=True) for ids in docs]
    n_bytes = sum(len(text.encode("utf-8")) for text in scored)
    n_words = sum(len(text.split()) for text in scored)
    return {"perplexity": result.perplexity, "nll": result.nll, "documents": len(docs),
            "tokens": result.tokens, "bytes": n_bytes, "words": n_words,
            "bits_per_byte": result.nll_sum / math.log(2) / n_bytes if n_bytes else math.nan,
            "word_perplexity": math.exp(result.nll_sum / n_words) if n_words else math.nan,
            "seconds": time.monotonic() - began}


@dataclass(frozen=True)
class Diagnosis:
    base: str
    format: str
    seq_len: int
    domain: dict[str, float]
    general: dict[str, float]
    fragmentation: FragmentationReport
    thresholds: Thresholds
    recommendation: Recommendation

    seconds: dict[str, float] = field(default_factory=dict)
    """Where the time went: loading, scoring each sample, the tokenizer analysis."""

    @property
    def gap(self) -> float:
        return self.domain["bits_per_byte"] / self.general["bits_per_byte"]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "format": self.format, "seq_len": self.seq_len,
                "domain": self.domain, "general": self.general, "gap": self.gap,
                "token_gap": self.domain["perplexity"] / self.general["perplexity"],
                "fragmentation": self.fragmentation.to_dict(),
                "thresholds": asdict(self.thresholds), "why": WHY, "seconds": self.seconds,
                "recommendation": asdict(self.recommendation)}

    def render(self) -> str:
        d, g, frag, rec = self.domain, self.general, self.fragmentation, self.recommendation
        lines = [f"base: {self.base} ({self.format}), scored in windows of {self.seq_len} tokens",
                 "                 bits/byte  ppl/token   ppl/word",
                 _ppl_line("domain ", d), _ppl_line("general", g),
                 f"  gap (domain / general, per byte): {self.gap:.2f}x   (per token: "
                 f"{d['perplexity'] / g['perplexity']:.2f}x, not comparable across tokenizations)",
                 f"  fragmentation: splitting frequent domain terms costs {frag.excess} of "
                 f"{frag.domain_tokens} domain tokens ({frag.excess_share:.1%}), r̄ = {frag.r_bar:.2f} over "
                 f"{len(frag.terms)} terms; the top {len(frag.candidates)} would save {frag.saving} "
                 f"({frag.saving_share:.1%})"]
        if frag.candidates:
            lines += ["  most fragmented frequent terms, by tokens saved:",
                      *format_terms(frag.candidates)]
        th = self.thresholds
        lines += ["", f"recommendation: {rec.summary}", *[f"  - {r}" for r in rec.reasons], "",
                  f"thresholds: gap {th.gap:g}x (borderline {th.weak_gap:g}x): {WHY['gap']}; "
                  f"fragmentation {th.fragmentation:.0%}: {WHY['fragmentation']}; "
                  f"saving {th.saving:.0%}: {WHY['saving']}"]
        if self.seconds:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _ppl_line(name: str, m: dict[str, float]) -> str:
    return (f"  {name}  {m['bits_per_byte']:9.3f}  {m['perplexity']:9.4g}  {m['word_perplexity']:9.4g}   "
            f"({m['documents']:.0f} docs, {m['tokens']:.0f} tokens, {m['bytes']:.0f} bytes scored)")


def data_format(uri: str, given: str) -> str:
    """`auto`: JSONL for .jsonl / .json, Parquet for .parquet, text files otherwise."""
    if given != "auto":
        return given
    name = uri.rstrip("/").lower()
    return "jsonl" if name.endswith((".jsonl", ".json")) else "parquet" if name.endswith(".parquet") else "text"


def read_sample(uri: str, args: argparse.Namespace, label: str) -> list[str]:
    from .evals.data import read_texts

    return read_texts(uri, format=data_format(uri, args.format_data), field=args.field,
                      max_samples=args.max_docs, label=label)


def run(args: argparse.Namespace) -> Diagnosis:
    from cpt_api.spec import BaseModelSpec, TokenizerSpec

    from .model import load_base

    domain = read_sample(args.domain, args, "domain sample")
    general = read_sample(args.general, args, "general sample")
    began = time.monotonic()
    model, tokenizer = load_base(BaseModelSpec(uri=args.base, format=args.format),
                                 TokenizerSpec(uri=args.tokenizer) if args.tokenizer else None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)  # type: ignore[arg-type]  # transformers types .to as a decorator
    seconds = {"loading": time.monotonic() - began}
    seq_len = min(args.seq_len, int(getattr(model.config, "max_position_embeddings", None)
                                    or args.seq_len))
    ppl = {}
    for name, texts in (("domain", domain), ("general", general)):
        progress(f"scoring the {name} sample ({len(texts)} documents, up to {args.max_tokens} tokens)")
        ppl[name] = perplexity(model, tokenizer, texts, seq_len=seq_len, max_tokens=args.max_tokens,
                               device=device)
        seconds[f"{name} sample"] = ppl[name].pop("seconds")
    began = time.monotonic()
    frag = analyze(tokenizer, domain, general, top=args.top)
    seconds["fragmentation"] = time.monotonic() - began
    th = Thresholds(args.gap_threshold, args.weak_gap, args.fragmentation_threshold,
                    args.saving_threshold)
    rec = recommend(ppl["domain"]["bits_per_byte"], ppl["general"]["bits_per_byte"], frag, th)
    return Diagnosis(args.base, args.format, seq_len, ppl["domain"], ppl["general"], frag, th, rec, seconds)


def progress(message: str) -> None:
    """A line on stderr while the report is being made (stdout carries only the report)."""
    print(f"diagnose: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    th = Thresholds()
    p = argparse.ArgumentParser(prog="cptctl diagnose", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="HF model directory, .gguf file or checkpoint")
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "checkpoint"])
    p.add_argument("--tokenizer", help="tokenizer location (default: the base's own)")
    p.add_argument("--domain", required=True, help="domain sample: file, directory or glob")
    p.add_argument("--general", required=True, help="general sample: file, directory or glob")
    p.add_argument("--format-data", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                   help="auto: by file name (.jsonl, .parquet, else one text file per document)")
    p.add_argument("--field", default="text", help="JSONL / Parquet field holding the text")
    p.add_argument("--max-docs", type=int, default=64, help="documents read from each sample")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="tokens scored per sample, split evenly over its documents")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--top", type=int, default=15, help="fragmented terms listed")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--gap-threshold", type=float, default=th.gap)
    p.add_argument("--weak-gap", type=float, default=th.weak_gap)
    p.add_argument("--fragmentation-threshold", type=float, default=th.fragmentation,
                   help="share of the domain tokens spent on splitting frequent domain terms")
    p.add_argument("--saving-threshold", type=float, default=th.saving)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    try:
        report = run(args)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
