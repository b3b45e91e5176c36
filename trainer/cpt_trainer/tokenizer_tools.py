"""`cptctl tokenizer analyze`: fragmentation of frequent domain terms and extension candidates.

    python -m cpt_trainer.tokenizer_tools analyze --tokenizer DIR --domain GLOB [--general GLOB]
    python -m cpt_trainer.tokenizer_tools analyze --base FILE.gguf --format gguf --domain GLOB

Prints r(u) for the frequent domain terms, the frequency-weighted mean r̄, and the candidates
ranked by the context tokens one new token each would save (see `fragmentation.py`). Only the
tokenizer is loaded, never the weights.
"""
from __future__ import annotations

import argparse
import json
import sys

from transformers import PreTrainedTokenizerBase

from .errors import Refused
from .fragmentation import FragmentationReport, analyze, format_terms


def load_tokenizer_only(tokenizer: str | None, base: str | None, fmt: str) -> PreTrainedTokenizerBase:
    from cpt_api.spec import BaseModelSpec, ModelFormat, TokenizerSpec

    from .model import load_tokenizer

    if tokenizer and tokenizer.endswith(".gguf"):  # a GGUF file carries its tokenizer
        return load_tokenizer(BaseModelSpec(uri=tokenizer, format=ModelFormat.gguf))
    if tokenizer:
        return load_tokenizer(BaseModelSpec(uri=tokenizer), TokenizerSpec(uri=tokenizer))
    if not base:
        raise Refused("name the tokenizer with --tokenizer URI or --base URI [--format ...]")
    return load_tokenizer(BaseModelSpec(uri=base, format=ModelFormat(fmt)))


def render(report: FragmentationReport, source: str) -> str:
    lines = [f"tokenizer: {source}",
             f"  {len(report.terms)} frequent domain terms in {report.domain_words} words / "
             f"{report.domain_tokens} tokens",
             f"  r̄ = {report.r_bar:.2f} sub-tokens per term (frequency-weighted)",
             f"  adding the {len(report.candidates)} candidates below saves {report.saving} tokens "
             f"({report.saving_share:.1%} of the domain sample's context)"]
    if report.candidates:
        lines += ["", "  candidates, by tokens saved:", *format_terms(report.candidates)]
    lines += ["", "  extend only terms that are frequent and valuable, and measure the effect "
              "(new rows are under-trained at first)"]
    return "\n".join(lines)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .diagnose import quiet_transformers, read_sample

    quiet_transformers()
    tokenizer = load_tokenizer_only(args.tokenizer, args.base, args.format)
    domain = read_sample(args.domain, args, "domain sample")
    general = read_sample(args.general, args, "general sample") if args.general else None
    report = analyze(tokenizer, domain, general, top=args.top, min_count=args.min_count,
                     min_ratio=args.min_ratio, max_terms=args.max_terms)
    source = args.tokenizer or f"{args.base} ({args.format})"
    print(json.dumps({"tokenizer": source, **report.to_dict()}, indent=2) if args.json
          else render(report, source))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cptctl tokenizer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="fragmentation r̄ and extension candidates for a domain")
    a.add_argument("--tokenizer", help="tokenizer directory (or a .gguf file)")
    a.add_argument("--base", help="base model whose tokenizer to analyse")
    a.add_argument("--format", default="hf", choices=["hf", "gguf", "checkpoint"])
    a.add_argument("--domain", required=True, help="domain sample: file, directory or glob")
    a.add_argument("--general", help="general sample; terms frequent there are not domain terms")
    a.add_argument("--format-data", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                   help="auto: by file name (.jsonl, .parquet, else one text file per document)")
    a.add_argument("--field", default="text")
    a.add_argument("--max-docs", type=int, default=256)
    a.add_argument("--top", type=int, default=30, help="candidates listed")
    a.add_argument("--min-count", type=int, default=3, help="occurrences for a term to count")
    a.add_argument("--min-ratio", type=float, default=5.0,
                   help="domain rate / general rate for a term to be domain-specific")
    a.add_argument("--max-terms", type=int, default=500, help="frequent terms analysed")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
