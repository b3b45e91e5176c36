"""`cptctl diagnose`: is continued pretraining the right lever for this domain?

Measures, before anyone spends GPU hours (shared/MISSION.md §1, §6):

1. the base model's perplexity on a domain sample and on a general sample, and their ratio
   (the *gap*): a base that finds domain text much harder than general text lacks knowledge or
   distribution, which is what CPT fixes;
2. the tokenizer's fragmentation of frequent domain terms, `r̄`, and the context an extension
   would save (`fragmentation.py`).

Recommendation rules (the thresholds are options):

- gap ≥ `--gap-threshold` (1.5): **CPT warranted**. With r̄ ≥ `--fragmentation-threshold` (2.0)
  and a saving of at least `--saving-threshold` (2%) of the domain tokens, tokenizer extension
  is worth measuring as well.
- `--weak-gap` (1.2) ≤ gap, or a smaller gap but heavy fragmentation: **borderline**: try
  prompting with domain context / RAG first, and if they fall short run a small CPT pilot with
  evaluation gates.
- otherwise **CPT not indicated**: the base already models the domain about as well as general
  text; remaining problems are likely behaviour (SFT), freshness (RAG) or prompting.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import Refused
from .fragmentation import FragmentationReport, analyze, format_terms


@dataclass(frozen=True)
class Thresholds:
    gap: float = 1.5
    weak_gap: float = 1.2
    fragmentation: float = 2.0
    saving: float = 0.02


@dataclass(frozen=True)
class Recommendation:
    verdict: str
    """`cpt`, `borderline` or `not-cpt`."""
    summary: str
    reasons: list[str] = field(default_factory=list)


ALWAYS = ("CPT changes knowledge and distribution; it does not fix behaviour (output format, tool "
          "protocol, tone, refusals: SFT) or freshness (RAG). Plan a small SFT and a safety "
          "evaluation after CPT.")


def recommend(ppl_domain: float, ppl_general: float, frag: FragmentationReport,
              th: Thresholds = Thresholds()) -> Recommendation:
    gap = ppl_domain / ppl_general
    fragmented = math.isfinite(frag.r_bar) and frag.r_bar >= th.fragmentation
    extension_pays = fragmented and frag.saving_share >= th.saving
    reasons = [_gap_reason(gap, ppl_domain, ppl_general, th), _fragmentation_reason(frag, th)]
    if gap >= th.gap:
        verdict, summary = "cpt", "CPT warranted: the base lacks the domain's distribution"
        if extension_pays:
            reasons.append("tokenizer extension is worth measuring (`cptctl tokenizer analyze`): "
                           "its saving is above the threshold; extend only the listed terms")
    elif gap >= th.weak_gap or fragmented:
        verdict = "borderline"
        summary = ("borderline: try prompting with domain context or RAG first; if they fall short, "
                   "run a small CPT pilot with general and safety gates")
    else:
        verdict = "not-cpt"
        summary = ("CPT not indicated: try prompting, RAG or SFT first; the base already models "
                   "the domain at least about as well as general text")
    return Recommendation(verdict, summary, reasons + [ALWAYS])


def _gap_reason(gap: float, ppl_domain: float, ppl_general: float, th: Thresholds) -> str:
    if gap >= th.gap:
        level = f"at least {th.gap:g}x: a large knowledge / distribution gap"
    elif gap >= th.weak_gap:
        level = f"between {th.weak_gap:g}x and {th.gap:g}x: a moderate gap"
    elif gap >= 1:
        level = f"below {th.weak_gap:g}x: no distribution gap to close"
    else:
        level = "the base already finds domain text easier than general text"
    return (f"domain perplexity {ppl_domain:.4g} is {gap:.2f}x the general perplexity "
            f"{ppl_general:.4g} ({level})")


def _fragmentation_reason(frag: FragmentationReport, th: Thresholds) -> str:
    if not frag.terms:
        return "no frequent domain-specific terms found in the sample (fragmentation not measured)"
    level = "heavily" if frag.r_bar >= th.fragmentation else "not heavily"
    return (f"frequent domain terms are {level} fragmented: r̄ = {frag.r_bar:.2f} sub-tokens per "
            f"term (threshold {th.fragmentation:g}); one token per top-{len(frag.candidates)} "
            f"term would save {frag.saving_share:.1%} of the domain tokens")


def quiet_transformers() -> None:
    """Loading progress bars would interleave with the report on the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # unannotated in transformers


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: list[str], *, seq_len: int,
               max_tokens: int, device: torch.device) -> dict[str, float]:
    from .evals.perplexity import document_ids, token_nll
    from .evals.runtime import inference

    docs = document_ids(tokenizer, texts, max_tokens=max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with inference(model, device, None):
        result = token_nll(model, docs, seq_len=seq_len, device=device, pad_id=int(pad))
    return {"perplexity": result.perplexity, "nll": result.nll, "documents": len(docs),
            "tokens": result.tokens}


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

    @property
    def gap(self) -> float:
        return self.domain["perplexity"] / self.general["perplexity"]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "format": self.format, "seq_len": self.seq_len,
                "domain": self.domain, "general": self.general, "gap": self.gap,
                "fragmentation": self.fragmentation.to_dict(),
                "thresholds": asdict(self.thresholds),
                "recommendation": asdict(self.recommendation)}

    def render(self) -> str:
        d, g, frag, rec = self.domain, self.general, self.fragmentation, self.recommendation
        lines = [f"base: {self.base} ({self.format}), perplexity in windows of {self.seq_len} tokens",
                 _ppl_line("domain ", d), _ppl_line("general", g),
                 f"  gap (domain / general): {self.gap:.2f}x",
                 f"  fragmentation r̄ = {frag.r_bar:.2f} over {len(frag.terms)} frequent domain "
                 f"terms; the top {len(frag.candidates)} would save {frag.saving} of "
                 f"{frag.domain_tokens} tokens ({frag.saving_share:.1%})"]
        if frag.candidates:
            lines += ["  most fragmented frequent terms, by tokens saved:",
                      *format_terms(frag.candidates)]
        lines += ["", f"recommendation: {rec.summary}", *[f"  - {r}" for r in rec.reasons]]
        return "\n".join(lines)


def _ppl_line(name: str, m: dict[str, float]) -> str:
    return (f"  {name} perplexity {m['perplexity']:10.4g}  ({m['documents']:.0f} docs, "
            f"{m['tokens']:.0f} tokens scored)")


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
    from cpt_operator.api.spec import BaseModelSpec, TokenizerSpec

    from .model import load_base

    domain = read_sample(args.domain, args, "domain sample")
    general = read_sample(args.general, args, "general sample")
    model, tokenizer = load_base(BaseModelSpec(uri=args.base, format=args.format),
                                 TokenizerSpec(uri=args.tokenizer) if args.tokenizer else None)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)  # type: ignore[arg-type]  # transformers types .to as a decorator
    seq_len = min(args.seq_len, int(getattr(model.config, "max_position_embeddings", None)
                                    or args.seq_len))
    ppl = {name: perplexity(model, tokenizer, texts, seq_len=seq_len, max_tokens=args.max_tokens,
                            device=device)
           for name, texts in (("domain", domain), ("general", general))}
    frag = analyze(tokenizer, domain, general, top=args.top)
    th = Thresholds(args.gap_threshold, args.weak_gap, args.fragmentation_threshold,
                    args.saving_threshold)
    rec = recommend(ppl["domain"]["perplexity"], ppl["general"]["perplexity"], frag, th)
    return Diagnosis(args.base, args.format, seq_len, ppl["domain"], ppl["general"], frag, th, rec)


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
    p.add_argument("--fragmentation-threshold", type=float, default=th.fragmentation)
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
